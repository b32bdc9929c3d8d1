-- The configuration server's schema. Portable SQL: the same file runs on
-- SQLite and PostgreSQL. Objects are kept as JSON documents of the API types
-- (column `doc`), with the columns queries filter on or keep unique beside
-- them. Times are RFC 3339 text in UTC, which sorts chronologically.

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    component_id TEXT,
    created_at TEXT NOT NULL,
    revoked BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE sites (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);

CREATE TABLE components (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    site_id TEXT NOT NULL REFERENCES sites (id),
    doc TEXT NOT NULL,
    UNIQUE (role, name)
);

CREATE TABLE policies (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);

CREATE TABLE replication_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);

CREATE TABLE plans (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);

CREATE TABLE items (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    phase TEXT NOT NULL,
    direction TEXT NOT NULL,
    group_id TEXT,
    job_id TEXT,
    doc TEXT NOT NULL
);

CREATE TABLE points (
    item_id TEXT NOT NULL REFERENCES items (id),
    id TEXT NOT NULL,
    time TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (item_id, id)
);
CREATE INDEX points_by_time ON points (item_id, time);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    item_id TEXT,
    plan_id TEXT,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX jobs_by_item ON jobs (item_id, created_at);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE INDEX jobs_by_time ON jobs (created_at);
