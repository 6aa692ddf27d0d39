-- chatd initial schema.
-- Every durable room fact is one row of `events`, numbered by a gapless per-room
-- `seq` taken from rooms.last_seq inside the committing transaction.

CREATE TABLE users (
    id            text PRIMARY KEY,
    display_name  text NOT NULL DEFAULT '',
    password_hash text,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz
);

CREATE TABLE rooms (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('dm', 'group')),
    title      text NOT NULL DEFAULT '',
    public     boolean NOT NULL DEFAULT false,
    -- "userA\x1fuserB" (sorted) for DMs: one DM per pair of users.
    dm_key     text UNIQUE,
    created_by text NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    last_seq   bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    CHECK ((kind = 'dm') = (dm_key IS NOT NULL))
);

CREATE TABLE members (
    room_id       bigint NOT NULL REFERENCES rooms (id),
    user_id       text NOT NULL REFERENCES users (id),
    role          text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    -- Visibility window in the room's log: events with joined_seq <= seq, and
    -- (for a member who left or was removed) seq <= left_seq.
    joined_seq    bigint NOT NULL,
    left_seq      bigint,
    joined_at     timestamptz NOT NULL DEFAULT now(),
    left_at       timestamptz,
    read_seq      bigint NOT NULL DEFAULT 0,
    delivered_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX members_current_by_user ON members (user_id, room_id) WHERE left_seq IS NULL;

CREATE TABLE events (
    room_id    bigint NOT NULL REFERENCES rooms (id),
    seq        bigint NOT NULL CHECK (seq > 0),
    kind       text NOT NULL,
    sender     text NOT NULL,
    -- Kind-specific fields (see docs/protocol.md). For kind 'message' the
    -- current body lives in `body` so edits and deletes update one place.
    data       jsonb NOT NULL DEFAULT '{}'::jsonb,
    body       text,
    edited     boolean NOT NULL DEFAULT false,
    deleted    boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    search     tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(body, ''))) STORED,
    PRIMARY KEY (room_id, seq)
);
CREATE INDEX events_search ON events USING gin (search) WHERE kind = 'message' AND NOT deleted;
CREATE INDEX events_by_sender ON events (sender, created_at);

CREATE TABLE reactions (
    room_id    bigint NOT NULL,
    seq        bigint NOT NULL,
    emoji      text NOT NULL,
    user_id    text NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, seq, emoji, user_id),
    FOREIGN KEY (room_id, seq) REFERENCES events (room_id, seq)
);

-- Idempotency: a durable command's client-chosen id -> its original result.
CREATE TABLE idempotency (
    user_id    text NOT NULL,
    client_id  text NOT NULL,
    command    text NOT NULL,
    result     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, client_id)
);
CREATE INDEX idempotency_age ON idempotency (created_at);
