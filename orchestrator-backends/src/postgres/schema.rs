//! The backend's tables, created and migrated by the library.
//!
//! Each migration runs once per schema, in one transaction with its row in
//! `<schema>.migrations`, under a transaction-scoped advisory lock of the schema: processes
//! that start at once queue on the lock, and each finds the work done by the first.

use deadpool_postgres::Object;
use orchestrator_core::{Error, Result};

use super::config::quote_ident;
use super::conn::{BACKEND, pg_error};

/// The first key of the advisory lock taken around migrations (the second is the schema's
/// `hashtext`): `'ORCM'` in ASCII.
const MIGRATION_LOCK_CLASS: i32 = 0x4f52_434d;

/// The first key of the advisory lock every append takes (the second is the schema's
/// `hashtext`): `'ORCA'` in ASCII.
pub(crate) const APPEND_LOCK_CLASS: i32 = 0x4f52_4341;

/// One step of the schema, written with `{schema}` for the quoted schema name.
struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Never edit one that shipped: add the next.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "events, inbox, leases",
        sql: r"
CREATE TABLE {schema}.events (
    position       bigint      PRIMARY KEY,
    stream_id      text        NOT NULL,
    stream_version bigint      NOT NULL,
    event_id       text        NOT NULL,
    event_type     text        NOT NULL,
    event_time     timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    event          json        NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_stream_event_id_key UNIQUE (stream_id, event_id),
    CONSTRAINT events_position_positive CHECK (position > 0),
    CONSTRAINT events_stream_version_positive CHECK (stream_version > 0)
);
CREATE INDEX events_type_position_idx ON {schema}.events (event_type, position);
CREATE INDEX events_time_idx ON {schema}.events (event_time);

CREATE TABLE {schema}.inbox (
    group_name  text        NOT NULL,
    event_id    text        NOT NULL,
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, event_id)
);
CREATE INDEX inbox_group_seq_idx ON {schema}.inbox (group_name, seq);
CREATE INDEX inbox_group_recorded_idx ON {schema}.inbox (group_name, recorded_at);

CREATE TABLE {schema}.leases (
    name       text        PRIMARY KEY,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL
);
",
    },
    Migration {
        version: 2,
        description: "append_events: an append in one statement under the append lock",
        sql: APPEND_EVENTS,
    },
    Migration {
        version: 3,
        description: "append_batch: several appends in one transaction, a result each",
        sql: APPEND_BATCH,
    },
    Migration {
        version: 4,
        description: "transport: subscriptions, queue, dead letters",
        sql: r"
CREATE TABLE {schema}.transport_subscriptions (
    group_name text    NOT NULL,
    pattern    text    NOT NULL,
    regex      text    NOT NULL,
    ephemeral  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (group_name, pattern)
);

CREATE TABLE {schema}.transport_queue (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_name       text        NOT NULL,
    topic            text        NOT NULL,
    event            text        NOT NULL,
    attempt          integer     NOT NULL DEFAULT 1,
    first_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    not_before       timestamptz NOT NULL DEFAULT now(),
    locked_until     timestamptz
);
CREATE INDEX transport_queue_group_idx ON {schema}.transport_queue (group_name, id);

CREATE TABLE {schema}.dead_letters (
    seq          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           text        NOT NULL UNIQUE,
    event_type   text        NOT NULL,
    subscription text        NOT NULL,
    letter       text        NOT NULL,
    dead_at      timestamptz NOT NULL DEFAULT now()
);
",
    },
    Migration {
        version: 5,
        description: "read models: documents and positions",
        sql: r"
CREATE TABLE IF NOT EXISTS {schema}.read_model_documents (
    read_model text        NOT NULL,
    key        text        NOT NULL,
    document   jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (read_model, key)
);

CREATE TABLE IF NOT EXISTS {schema}.read_model_positions (
    read_model text        PRIMARY KEY,
    position   bigint      NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
",
    },
];

/// An append, server-side, so that the lock is held for the statement and the commit only
/// (no client round trip in between). Takes the append lock; then, in this order:
/// status 1 (nothing written) when the stream holds any of the ids — the caller tells a
/// retry from a duplicate, facts that no later append changes; status 2 (nothing written,
/// `version` the stream's) when the expectation fails — kinds 0 any, 1 no stream, 2 an
/// existing stream, 3 exactly `p_expected`; else status 0: the events are written at
/// `head + 1 …` and versions after the stream's, each JSON (`p_events`, without its
/// closing brace) completed with its `streamversion` and `globalposition`, and the channel
/// notified with the last position.
const APPEND_EVENTS: &str = r#"
CREATE FUNCTION {schema}.append_events(
    p_stream text, p_expected_kind integer, p_expected bigint,
    p_ids text[], p_types text[], p_times timestamptz[], p_events text[],
    p_lock_class integer, p_lock_key integer, p_channel text,
    OUT status integer, OUT version bigint, OUT first_position bigint, OUT last_position bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_head bigint;
    v_count integer := coalesce(array_length(p_ids, 1), 0);
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_class, p_lock_key);
    IF v_count > 0 AND EXISTS (
        SELECT 1 FROM {schema}.events e WHERE e.stream_id = p_stream AND e.event_id = ANY (p_ids)
    ) THEN
        status := 1;
        RETURN;
    END IF;
    SELECT max(e.stream_version) INTO version FROM {schema}.events e WHERE e.stream_id = p_stream;
    IF (p_expected_kind = 1 AND version IS NOT NULL)
        OR (p_expected_kind = 2 AND version IS NULL)
        OR (p_expected_kind = 3 AND version IS DISTINCT FROM p_expected) THEN
        status := 2;
        RETURN;
    END IF;
    SELECT coalesce(max(e.position), 0) INTO v_head FROM {schema}.events e;
    version := coalesce(version, 0);
    first_position := v_head + 1;
    last_position := v_head + v_count;
    IF v_count > 0 THEN
        INSERT INTO {schema}.events
            (position, stream_id, stream_version, event_id, event_type, event_time, event)
        SELECT v_head + u.i, p_stream, version + u.i, u.id, u.ty, u.tm,
               (u.ev || ',"streamversion":' || (version + u.i) || ',"globalposition":'
                   || (v_head + u.i) || '}')::json
        FROM unnest(p_ids, p_types, p_times, p_events) WITH ORDINALITY AS u(id, ty, tm, ev, i);
        PERFORM pg_notify(p_channel, last_position::text);
        version := version + v_count;
    END IF;
    status := 0;
END
$fn$;
"#;

/// Several appends in one statement (group commit), each checked and written in turn under
/// the append lock as [`APPEND_EVENTS`] checks and writes one, so that each gets the result
/// it would have had alone, run in this order. Append `i` is `p_streams[i]`,
/// `p_kinds[i]`/`p_expected[i]` (its expectation) and the next `p_counts[i]` elements of the
/// event arrays. One row per append, `idx` its index (1-based): status 0 (written: `version`
/// the stream's new version, positions `first_position ..= last_position`), 1 (nothing
/// written: the stream holds some of its ids) or 2 (nothing written: the expectation fails,
/// `version` the stream's). A failing append writes nothing and leaves the others alone. The
/// channel is notified once, with the last position written.
const APPEND_BATCH: &str = r#"
CREATE FUNCTION {schema}.append_batch(
    p_streams text[], p_kinds integer[], p_expected bigint[], p_counts integer[],
    p_ids text[], p_types text[], p_times timestamptz[], p_events text[],
    p_lock_class integer, p_lock_key integer, p_channel text)
RETURNS TABLE (idx integer, status integer, version bigint, first_position bigint,
               last_position bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_head bigint;
    v_from integer := 1;
    v_to integer;
    v_stream text;
    v_kind integer;
    v_current bigint;
    v_written boolean := false;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_class, p_lock_key);
    SELECT coalesce(max(e.position), 0) INTO v_head FROM {schema}.events e;
    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        idx := i;
        v_stream := p_streams[i];
        v_kind := p_kinds[i];
        v_to := v_from + p_counts[i] - 1;
        version := NULL;
        first_position := NULL;
        last_position := NULL;
        IF p_counts[i] > 0 AND EXISTS (
            SELECT 1 FROM {schema}.events e
            WHERE e.stream_id = v_stream AND e.event_id = ANY (p_ids[v_from:v_to])
        ) THEN
            status := 1;
        ELSE
            SELECT max(e.stream_version) INTO v_current
            FROM {schema}.events e WHERE e.stream_id = v_stream;
            IF (v_kind = 1 AND v_current IS NOT NULL)
                OR (v_kind = 2 AND v_current IS NULL)
                OR (v_kind = 3 AND v_current IS DISTINCT FROM p_expected[i]) THEN
                status := 2;
                version := v_current;
            ELSE
                v_current := coalesce(v_current, 0);
                first_position := v_head + 1;
                last_position := v_head + p_counts[i];
                IF p_counts[i] > 0 THEN
                    INSERT INTO {schema}.events
                        (position, stream_id, stream_version, event_id, event_type,
                         event_time, event)
                    SELECT v_head + u.n, v_stream, v_current + u.n, u.id, u.ty, u.tm,
                           (u.ev || ',"streamversion":' || (v_current + u.n)
                               || ',"globalposition":' || (v_head + u.n) || '}')::json
                    FROM unnest(p_ids[v_from:v_to], p_types[v_from:v_to],
                                p_times[v_from:v_to], p_events[v_from:v_to])
                         WITH ORDINALITY AS u(id, ty, tm, ev, n);
                    v_head := v_head + p_counts[i];
                    v_written := true;
                END IF;
                version := v_current + p_counts[i];
                status := 0;
            END IF;
        END IF;
        v_from := v_to + 1;
        RETURN NEXT;
    END LOOP;
    IF v_written THEN
        PERFORM pg_notify(p_channel, v_head::text);
    END IF;
END
$fn$;
"#;

/// The schema version this build writes and reads.
pub(crate) fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Creates `schema` and brings its tables to the latest version; returns the schema's
/// `hashtext`, the second key of its advisory locks.
pub(crate) async fn migrate(client: &mut Object, schema: &str) -> Result<i32> {
    let q = quote_ident(schema);
    let tx = client.transaction().await.map_err(pg_error)?;
    let key: i32 = tx
        .query_one("SELECT hashtext($1)", &[&schema])
        .await
        .map_err(pg_error)?
        .get(0);
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&MIGRATION_LOCK_CLASS, &key],
    )
    .await
    .map_err(pg_error)?;
    // `CREATE SCHEMA IF NOT EXISTS` needs `CREATE` on the database even when the schema
    // exists: look first, so that a user given a schema by an administrator can connect.
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {q}"))
            .await
            .map_err(pg_error)?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {q}.migrations (
             version     integer     PRIMARY KEY,
             description text        NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(pg_error)?;
    let current: i32 = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {q}.migrations"),
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    if current > latest_version() {
        return Err(Error::backend(
            BACKEND,
            false,
            format!(
                "schema {q} is at version {current}, newer than this build of \
                 orchestrator-backends knows ({}): upgrade the library",
                latest_version()
            ),
        ));
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(&migration.sql.replace("{schema}", &q))
            .await
            .map_err(pg_error)?;
        tx.execute(
            &format!("INSERT INTO {q}.migrations (version, description) VALUES ($1, $2)"),
            &[&migration.version, &migration.description],
        )
        .await
        .map_err(pg_error)?;
        tracing::info!(schema, version = migration.version, "migrated");
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(key)
}
