"""Who may do what in a room. Pure functions: they raise chatd errors, do no I/O.

Roles rank owner > admin > member.
- add member: owner or admin; the new member's role may not exceed the adder's,
  and only an owner may add an owner or admin.
- remove member: an admin may remove plain members; an owner may remove anyone
  but themself (an owner leaves with `leave`).
- set role: only an owner grants or revokes admin/owner; nobody changes their own role.
- update room (title): owner or admin.
- join: only public groups, by anyone not already a member.
- DMs have exactly two members forever: no join, leave, add, remove, role change
  or update.
"""

from __future__ import annotations

from chatd import errors
from chatd.domain.model import ROLE_RANK


def _no_dm(kind: str, what: str) -> None:
    if kind == "dm":
        raise errors.Forbidden(f"a direct message room cannot {what}")


def check_add(kind: str, actor_role: str | None, new_role: str) -> None:
    _no_dm(kind, "gain members")
    if actor_role not in ("owner", "admin"):
        raise errors.Forbidden("only owners and admins add members")
    if new_role != "member" and actor_role != "owner":
        raise errors.Forbidden("only owners add admins or owners")


def check_remove(kind: str, actor: str, actor_role: str | None, target: str, target_role: str | None) -> None:
    _no_dm(kind, "lose members")
    if target_role is None:
        raise errors.NotFound("not a member of this room", user_id=target)
    if actor == target:
        raise errors.Forbidden("use leave to leave a room")
    if actor_role == "owner":
        return
    if actor_role == "admin" and target_role == "member":
        return
    raise errors.Forbidden("your role cannot remove this member")


def check_set_role(kind: str, actor: str, actor_role: str | None, target: str, target_role: str | None, role: str) -> None:
    _no_dm(kind, "change roles")
    if target_role is None:
        raise errors.NotFound("not a member of this room", user_id=target)
    if actor == target:
        raise errors.Forbidden("you cannot change your own role")
    if actor_role != "owner":
        raise errors.Forbidden("only owners change roles")
    if role not in ROLE_RANK:
        raise errors.InvalidField("unknown role", field="$.role")


def check_update(kind: str, actor_role: str | None) -> None:
    _no_dm(kind, "be renamed")
    if actor_role not in ("owner", "admin"):
        raise errors.Forbidden("only owners and admins update the room")


def check_join(kind: str, public: bool, already_member: bool) -> None:
    _no_dm(kind, "be joined")
    if already_member:
        raise errors.Conflict("already a member")
    if not public:
        raise errors.Forbidden("this group is private: ask a member to add you")


def check_leave(kind: str, is_member: bool) -> None:
    _no_dm(kind, "be left")
    if not is_member:
        raise errors.NotFound("not a member of this room")


def successor(members: list[tuple[str, str, int]]) -> str | None:
    """Who becomes owner when the last owner leaves: the oldest admin, else the oldest member.

    ``members`` are (user_id, role, joined_seq) of those who remain.
    """
    if not members:
        return None
    ranked = sorted(members, key=lambda m: (-ROLE_RANK[m[1]], m[2]))
    return ranked[0][0]
