"""Who may do what in a room. Pure functions: they raise chatd errors, do no I/O.

Roles rank owner > admin > member.
- add member: owner or admin; the new member's role may not exceed the adder's,
  and only an owner may add an owner or admin.
- remove member: an admin may remove plain members; an owner may remove anyone
  but themself (an owner leaves with `leave`).
- set role: only an owner grants or revokes admin/owner; the last owner cannot
  be demoted (another owner must exist first).
- update room (title): owner or admin.
- join: only public groups, by anyone not already a member (others: not found).
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
    if actor == target:
        raise errors.Forbidden("use leave to leave a room")
    if target_role is None:
        raise errors.NotFound("not a member of this room", user_id=target)
    if actor_role == "owner":
        return
    if actor_role == "admin" and target_role == "member":
        return
    raise errors.Forbidden("your role cannot remove this member")


def check_set_role(kind: str, actor: str, actor_role: str | None, target: str, target_role: str | None, role: str, owners: int) -> None:
    """``owners`` is the room's current number of owners."""
    _no_dm(kind, "change roles")
    if actor_role != "owner":
        raise errors.Forbidden("only owners change roles")
    if target_role is None:
        raise errors.NotFound("not a member of this room", user_id=target)
    if role not in ROLE_RANK:
        raise errors.InvalidField("unknown role", field="$.role")
    if role == target_role:
        raise errors.Conflict(f"already {role}")
    if target_role == "owner" and owners <= 1:
        raise errors.Conflict("a group needs an owner: make someone else owner first", reason="last_owner")


def check_update(kind: str, actor_role: str | None) -> None:
    _no_dm(kind, "be renamed")
    if actor_role not in ("owner", "admin"):
        raise errors.Forbidden("only owners and admins update the room")


def check_join(kind: str, public: bool, already_member: bool) -> None:
    # A DM or a private group is invisible to non-members: it "does not exist".
    if kind == "dm" or (not public and not already_member):
        raise errors.NotFound("no such room")
    if already_member:
        raise errors.Conflict("already a member")


def check_leave(kind: str) -> None:
    _no_dm(kind, "be left")


def successor(members: list[tuple[str, str, int]]) -> str | None:
    """Who becomes owner when the last owner leaves: the oldest admin, else the oldest member.

    ``members`` are (user_id, role, seq of their member_joined event) of those who remain.
    """
    if not members:
        return None
    ranked = sorted(members, key=lambda m: (-ROLE_RANK[m[1]], m[2]))
    return ranked[0][0]
