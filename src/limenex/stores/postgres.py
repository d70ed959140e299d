"""A state store in PostgreSQL: :class:`PostgresStateStore`, shared by every process that
points at the same database and schema. The contract is :mod:`limenex.core.state`; totals,
windows, releases, lease expiry and refunds behave exactly as in
:class:`~limenex.core.stores.InMemoryStateStore` (see :mod:`limenex.core.stores`).

The tables
----------

Everything lives in one schema (``limenex`` by default), made by :meth:`migrate` or on
first use::

    meta      (name, value)                          the schema's version
    counters  (id, dimension, scope, subject, win,   one row per CounterKey
               secs, total, period, head_at)
    entries   (counter, seq, at, amount)             rolling windows: one row per amount
    pending   (id, seq, created_at, expires_at,      reservations not settled yet,
               owner, counters, wheres, amounts,     indexed by expiry
               outcome)

``secs`` is 0 for a total without a window, -1 for a calendar window and the length in
seconds of a rolling one. ``total`` is NUMERIC, so sums are exact; a total is kept to 96
significant digits at most, as by :data:`~limenex.core.state.EXACT` (the engine does the
same arithmetic in Python for a dry run): a sum that would need more raises "cannot keep an
exact total" and changes nothing, never rounds. A calendar counter keeps the
period its total belongs to (``Window.bucket`` computed in Python from the engine's clock;
the server's clock is never read). A rolling counter keeps the running sum of its entries
and the time of its oldest one, ``head_at``: a reserve (or a peek, unless a reserve holds the
row) prunes the expired head only when ``head_at + secs <= now``, so pruning is amortised
(each entry is deleted once) and a key whose head is live costs no read of its entries.
A pending record lists, for each amount, the counter, where the amount went (nothing, the
calendar period, or the rolling entry's ``seq``) and the amount, which is what a release
undoes.

Atomicity and concurrency
-------------------------

Each operation is ONE statement, ``SELECT schema.fn(...)`` of a PL/pgSQL function, run in
autocommit: one transaction, one round trip. ``reserve`` locks every counter it names with
``SELECT ... FOR UPDATE`` (creating missing rows with ``INSERT ... ON CONFLICT DO NOTHING``)
in one canonical order, ``(dimension, scope, subject, window)`` as Python sorts it (the key
columns are ``COLLATE "C"``, the same order), then judges and writes. Concurrent
multi-key reservations therefore cannot deadlock; a deadlock or serialization failure that
an operator's ``reset`` might still cause is retried. No transaction waits for a pending
row while it holds a counter lock (expired records are dropped with ``SKIP LOCKED``), which
keeps settlements out of any lock cycle too. ``synchronous_commit`` is left on (raised to
``on`` if the server's default is ``off``): a spend that was allowed is on disk.

The reserve function takes a *batch*: several reservations judged in order, each
atomically on its own (all its checks hold and it is recorded, or nothing of it is), in
one transaction that locks the batch's counters once and writes each touched counter
once. The async path uses it: a reserve goes out at once if fewer than four of this event
loop's reserve statements are in flight, else it waits for one of them to return, and all
the reserves that waited go out together in the next statement. Each reservation travels in
exactly one statement, so under load one round trip serves many calls (a hot counter's row
lock and WAL flush are then paid once per batch, not once per call). The sync path sends
one reservation per statement.

One round trip per governed call
--------------------------------

A successful call is a reserve then a commit. ``commit`` only queues the reservation id
(:class:`~limenex.core.state.CommitQueue`); every function takes the queued ids as its
first argument and deletes their pending records in the same transaction, so the commit
rides on the next operation. The queue is sent on its own when it is full or old, and on
``close``.

Reservation ids are made by the client (a random per-store prefix and a counter), which
makes a reserve safe to retry after a lost connection: the retry looks the ids up first
and returns the outcome stored with the record instead of reserving twice; the primary key
on ``pending.id`` guarantees that at most one of two attempts commits.

Errors and time limits
----------------------

Every failure is a :class:`~limenex.core.errors.StateStoreError` naming the server
(``host:port``, never a password). Connecting is bounded by ``connect_timeout`` (whole
seconds, at least 2: libpq's rule), each statement by ``timeout``, on the server
(``statement_timeout``) and in the client (a hung server: the connection is dropped).
A broken connection is replaced on the next call.

Stores of one process with the same DSN and settings share their connection pools (one for
threads, one per event loop): every statement names its schema, so a connection serves any
schema, and a process with many stores (or a test suite) does not hold a pool for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any, ClassVar, NamedTuple, TypeVar

from limenex.core.errors import LimenexConfigError, StateStoreError
from limenex.core.state import (
    OPERATORS,
    Check,
    CommitQueue,
    CounterKey,
    PendingReservation,
    Reservation,
    StateBreach,
    StateStore,
    counter_window,
)
from limenex.core.window import CALENDAR_UNITS, Window

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg.abc import PQGen
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolClosed, PoolTimeout
except ImportError as exc:  # pragma: no cover - exercised by tests/stores/test_from_url.py
    raise LimenexConfigError(
        f"PostgresStateStore needs psycopg 3 and psycopg_pool ({exc.name or exc}): "
        "pip install 'limenex[postgres]'"
    ) from exc

__all__ = ["SCHEMA_VERSION", "PostgresStateStore"]

SCHEMA_VERSION = 1
"""The version of the tables and functions this module makes and uses."""


_LOCK_CLASS = 0x4C4D4E58  # "LMNX": the advisory lock class that serialises migrations
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_T = TypeVar("_T")
_R = TypeVar("_R")

# SQLSTATEs
_RETRY_STATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_MISSING_STATES = frozenset({"3F000", "42P01", "42883"})  # schema, table, function
_NUMERIC_OVERFLOW = "22003"

_MAX_BATCH = 256
"""At most this many reservations in one statement."""
_LANES = 4
"""At most this many reserve statements of one event loop in flight at once."""
_MARGIN = 0.5
"""Seconds the client waits for an answer beyond the server's statement_timeout."""
_SLICE = 0.2
"""How often a caller waiting for a pooled connection looks for a failed connect."""
_log = logging.getLogger(__name__)
_BACKGROUND: set[asyncio.Task[None]] = set()
"""Closing tasks started from sync code inside a running loop (kept from the collector)."""


# --- SQL ----------------------------------------------------------------------------------
# ``{s}`` is the quoted schema name (validated: letters, digits and underscores only).

_TABLES = """
CREATE SCHEMA IF NOT EXISTS {s};

CREATE TABLE {s}.meta (
    name text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE {s}.counters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dimension text COLLATE "C" NOT NULL,
    scope text COLLATE "C" NOT NULL,
    subject text COLLATE "C" NOT NULL,
    win text COLLATE "C" NOT NULL,
    secs integer NOT NULL,          -- 0: no window; -1: calendar; > 0: rolling seconds
    total numeric,                  -- NULL: nothing recorded
    period text COLLATE "C",        -- calendar: the period of total
    head_at double precision,       -- rolling: the time of the oldest entry
    UNIQUE (dimension, scope, subject, win)
) WITH (fillfactor = 80);

CREATE TABLE {s}.entries (
    counter bigint NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    at double precision NOT NULL,
    amount numeric NOT NULL,
    PRIMARY KEY (counter, seq)
);

CREATE TABLE {s}.pending (
    id text COLLATE "C" PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    owner text NOT NULL,
    counters bigint[] NOT NULL,
    wheres text[] NOT NULL,         -- '' | the calendar period | the rolling entry's seq
    amounts numeric[] NOT NULL,
    outcome text NOT NULL           -- what reserve answered, for a retried call
);

CREATE INDEX pending_expiry ON {s}.pending (expires_at);
"""

_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION {s}.digits(v numeric) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
-- The digits of v's coefficient, as Python's Decimal counts them when the exponent is minus
-- the scale: 1000 has 4, 100.50 has 5, 0.00123 has 3.
SELECT length(ltrim(replace(abs(v)::text, '.', ''), '0'))
$$;

CREATE OR REPLACE FUNCTION {s}.exact(v numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE AS $$
-- v, if it has at most 96 significant digits (as Limenex's EXACT context); else an error.
BEGIN
    IF (v >= 1e66 OR scale(v) > 30) AND {s}.digits(v) > 96 THEN
        RAISE EXCEPTION 'the total % needs more than 96 significant digits', v
              USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    RETURN v;
END $$;

CREATE OR REPLACE FUNCTION {s}.prune(
    p_id bigint, p_secs integer, p_now double precision, INOUT total numeric,
    OUT head double precision
) LANGUAGE plpgsql AS $$
-- Delete a rolling counter's expired entries from the oldest on; stop at the first live one.
DECLARE
    v_e record;
BEGIN
    FOR v_e IN SELECT e.seq, e.at, e.amount FROM {s}.entries e
                WHERE e.counter = p_id ORDER BY e.seq LOOP
        IF v_e.at + p_secs > p_now THEN
            head := v_e.at;
            RETURN;
        END IF;
        DELETE FROM {s}.entries WHERE counter = p_id AND seq = v_e.seq;
        total := total - v_e.amount;
    END LOOP;
    total := NULL;
    head := NULL;
END $$;

CREATE OR REPLACE FUNCTION {s}.counter(
    p_dim text, p_scope text, p_subject text, p_win text, p_secs integer,
    OUT id bigint, OUT total numeric, OUT period text, OUT head_at double precision
) LANGUAGE plpgsql AS $$
-- Lock a counter's row, creating it if missing.
BEGIN
    LOOP
        SELECT c.id, c.total, c.period, c.head_at INTO id, total, period, head_at
          FROM {s}.counters c
         WHERE c.dimension = p_dim AND c.scope = p_scope AND c.subject = p_subject
           AND c.win = p_win
           FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO {s}.counters AS c (dimension, scope, subject, win, secs)
        VALUES (p_dim, p_scope, p_subject, p_win, p_secs)
        ON CONFLICT DO NOTHING RETURNING c.id INTO id;
        EXIT WHEN FOUND;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION {s}.reserve(
    p_commits text[], p_owner text, p_lease double precision, p_retry boolean,
    p_expire_at double precision,
    k_dim text[], k_scope text[], k_subject text[], k_win text[], k_secs integer[],
    r_id text[], r_now double precision[], r_na integer[], r_nc integer[],
    a_key integer[], a_amount numeric[], a_bucket text[],
    c_amt integer[], c_op text[], c_limit numeric[]
) RETURNS text LANGUAGE plpgsql AS $$
-- Judge a batch of reservations in order, each atomically; one line of outcome for each:
-- '+' and the observed totals, or '-' and the failing position, observed and projected.
-- k_*: the batch's distinct counters in lock order. r_*: each reservation, with its count of
-- amounts (a_*: its distinct counters, first-named first) and of checks (c_*; c_amt points
-- into a_*).
DECLARE
    v_ids bigint[] := '{}';
    v_tot numeric[] := '{}';
    v_per text[] := '{}';
    v_head double precision[] := '{}';
    v_dirty boolean[] := '{}';
    v_id bigint; v_total numeric; v_period text; v_at double precision;
    v_cur numeric; v_proj numeric[] := '{}'; v_obs numeric[] := '{}'; v_where text[] := '{}';
    v_i integer; v_j integer; v_c integer; v_k integer; v_secs integer;
    v_a0 integer := 0; v_c0 integer := 0;
    v_now double precision; v_ok boolean; v_hold boolean; v_res text; v_seq bigint;
    v_out text[] := '{}';
    v_pid text[] := '{}'; v_pnow double precision[] := '{}'; v_poff integer[] := '{}';
    v_pn integer[] := '{}'; v_pres text[] := '{}';
    v_pc bigint[] := '{}'; v_pw text[] := '{}'; v_pa numeric[] := '{}';
BEGIN
    IF cardinality(p_commits) > 0 THEN
        DELETE FROM {s}.pending WHERE id = ANY (p_commits);
    END IF;
    -- Expired records go, a bounded number per call; their amounts stay counted.
    PERFORM FROM {s}.pending q WHERE q.expires_at <= p_expire_at LIMIT 1;
    IF FOUND THEN
        DELETE FROM {s}.pending WHERE id IN (
            SELECT q.id FROM {s}.pending q WHERE q.expires_at <= p_expire_at
             ORDER BY q.expires_at LIMIT 2 * cardinality(r_id) + 8 FOR UPDATE SKIP LOCKED);
    END IF;

    FOR v_k IN 1 .. cardinality(k_dim) LOOP
        LOOP
            SELECT c.id, c.total, c.period, c.head_at INTO v_id, v_total, v_period, v_at
              FROM {s}.counters c
             WHERE c.dimension = k_dim[v_k] AND c.scope = k_scope[v_k]
               AND c.subject = k_subject[v_k] AND c.win = k_win[v_k]
               FOR UPDATE;
            EXIT WHEN FOUND;
            INSERT INTO {s}.counters AS c (dimension, scope, subject, win, secs)
            VALUES (k_dim[v_k], k_scope[v_k], k_subject[v_k], k_win[v_k], k_secs[v_k])
            ON CONFLICT DO NOTHING RETURNING c.id INTO v_id;
            IF FOUND THEN
                v_total := NULL; v_period := NULL; v_at := NULL;
                EXIT;
            END IF;
        END LOOP;
        v_ids[v_k] := v_id; v_tot[v_k] := v_total; v_per[v_k] := v_period;
        v_head[v_k] := v_at; v_dirty[v_k] := false;
    END LOOP;

    FOR v_i IN 1 .. cardinality(r_id) LOOP
        v_now := r_now[v_i];
        IF p_retry THEN
            SELECT q.outcome INTO v_res FROM {s}.pending q WHERE q.id = r_id[v_i];
            IF FOUND THEN  -- an earlier attempt of this call was recorded
                v_out := v_out || v_res;
                v_a0 := v_a0 + r_na[v_i]; v_c0 := v_c0 + r_nc[v_i];
                CONTINUE;
            END IF;
        END IF;
        FOR v_j IN v_a0 + 1 .. v_a0 + r_na[v_i] LOOP
            v_k := a_key[v_j];
            v_secs := k_secs[v_k];
            IF v_secs = 0 THEN
                v_cur := coalesce(v_tot[v_k], 0);
                v_where[v_j] := '';
            ELSIF v_secs < 0 THEN
                IF v_per[v_k] IS NULL OR v_per[v_k] COLLATE "C" < a_bucket[v_j] THEN
                    v_cur := 0; v_where[v_j] := a_bucket[v_j];
                ELSE  -- this period, or a later one (another clock ran ahead): it wins
                    v_cur := v_tot[v_k]; v_where[v_j] := v_per[v_k];
                END IF;
            ELSE
                IF v_head[v_k] + v_secs <= v_now THEN
                    SELECT p.total, p.head INTO v_total, v_at
                      FROM {s}.prune(v_ids[v_k], v_secs, v_now, v_tot[v_k]) p;
                    v_tot[v_k] := v_total; v_head[v_k] := v_at; v_dirty[v_k] := true;
                END IF;
                v_cur := coalesce(v_tot[v_k], 0);
            END IF;
            v_obs[v_j] := v_cur;
            v_proj[v_j] := v_cur + a_amount[v_j];
            IF v_proj[v_j] >= 1e66 OR scale(v_proj[v_j]) > 30 THEN
                PERFORM {s}.exact(v_proj[v_j]);
            END IF;
        END LOOP;
        v_ok := true;
        v_res := '+';
        FOR v_c IN v_c0 + 1 .. v_c0 + r_nc[v_i] LOOP
            v_j := c_amt[v_c];
            v_hold := CASE c_op[v_c]
                WHEN 'lte' THEN v_proj[v_j] <= c_limit[v_c]
                WHEN 'lt' THEN v_proj[v_j] < c_limit[v_c]
                WHEN 'gte' THEN v_proj[v_j] >= c_limit[v_c]
                WHEN 'gt' THEN v_proj[v_j] > c_limit[v_c]
                WHEN 'eq' THEN v_proj[v_j] = c_limit[v_c]
                WHEN 'neq' THEN v_proj[v_j] <> c_limit[v_c]
            END;
            IF v_hold IS NOT TRUE THEN
                v_ok := false;
                v_res := '-' || (v_c - v_c0 - 1) || ',' || v_obs[v_j] || ',' || v_proj[v_j];
                EXIT;
            END IF;
            IF v_c > v_c0 + 1 THEN
                v_res := v_res || ',';
            END IF;
            v_res := v_res || v_obs[v_j];
        END LOOP;
        IF v_ok THEN
            v_poff := v_poff || (cardinality(v_pc) + 1);
            FOR v_j IN v_a0 + 1 .. v_a0 + r_na[v_i] LOOP
                v_k := a_key[v_j];
                v_tot[v_k] := v_proj[v_j];
                v_dirty[v_k] := true;
                IF k_secs[v_k] < 0 THEN
                    v_per[v_k] := v_where[v_j];
                ELSIF k_secs[v_k] > 0 THEN
                    INSERT INTO {s}.entries AS e (counter, at, amount)
                    VALUES (v_ids[v_k], v_now, a_amount[v_j]) RETURNING e.seq INTO v_seq;
                    v_where[v_j] := v_seq::text;
                    IF v_head[v_k] IS NULL THEN
                        v_head[v_k] := v_now;
                    END IF;
                END IF;
                v_pc := v_pc || v_ids[v_k];
                v_pw := v_pw || v_where[v_j];
                v_pa := v_pa || a_amount[v_j];
            END LOOP;
            v_pid := v_pid || r_id[v_i];
            v_pnow := v_pnow || v_now;
            v_pn := v_pn || r_na[v_i];
            v_pres := v_pres || v_res;
        END IF;
        v_out := v_out || v_res;
        v_a0 := v_a0 + r_na[v_i]; v_c0 := v_c0 + r_nc[v_i];
    END LOOP;

    FOR v_k IN 1 .. cardinality(k_dim) LOOP
        IF v_dirty[v_k] THEN
            UPDATE {s}.counters SET total = v_tot[v_k], period = v_per[v_k],
                   head_at = v_head[v_k]
             WHERE id = v_ids[v_k];
        END IF;
    END LOOP;
    IF cardinality(v_pid) = 1 THEN
        INSERT INTO {s}.pending
               (id, created_at, expires_at, owner, counters, wheres, amounts, outcome)
        VALUES (v_pid[1], v_pnow[1], v_pnow[1] + p_lease, p_owner, v_pc, v_pw, v_pa, v_pres[1]);
    ELSIF cardinality(v_pid) > 1 THEN
        INSERT INTO {s}.pending
               (id, created_at, expires_at, owner, counters, wheres, amounts, outcome)
        SELECT u.id, u.t, u.t + p_lease, p_owner, v_pc[u.o : u.o + u.n - 1],
               v_pw[u.o : u.o + u.n - 1], v_pa[u.o : u.o + u.n - 1], u.r
          FROM unnest(v_pid, v_pnow, v_poff, v_pn, v_pres) AS u(id, t, o, n, r);
    END IF;
    RETURN array_to_string(v_out, E'\n');
END $$;

CREATE OR REPLACE FUNCTION {s}.settle(p_commits text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {s}.pending WHERE id = ANY (p_commits);
END $$;

CREATE OR REPLACE FUNCTION {s}.release(
    p_commits text[], p_id text, p_now double precision
) RETURNS void LANGUAGE plpgsql AS $$
-- Drop a pending record; undo its amounts unless its lease has expired at p_now.
DECLARE
    v_rec record; v_c record; v_n integer; v_amount numeric; v_at double precision;
BEGIN
    IF cardinality(p_commits) > 0 THEN
        DELETE FROM {s}.pending WHERE id = ANY (p_commits);
    END IF;
    DELETE FROM {s}.pending q WHERE q.id = p_id
    RETURNING q.expires_at, q.counters, q.wheres, q.amounts INTO v_rec;
    IF NOT FOUND OR v_rec.expires_at <= p_now THEN
        RETURN;
    END IF;
    FOR v_c IN SELECT c.id, c.secs, c.total, c.period FROM {s}.counters c
                WHERE c.id = ANY (v_rec.counters)
                ORDER BY c.dimension, c.scope, c.subject, c.win FOR UPDATE LOOP
        v_n := array_position(v_rec.counters, v_c.id);
        v_amount := v_rec.amounts[v_n];
        -- (a total that the undo would take past 96 digits stays as it is: counted)
        IF v_c.secs = 0 THEN
            UPDATE {s}.counters SET total = greatest(v_c.total - v_amount, 0)
             WHERE id = v_c.id AND v_c.total IS NOT NULL
               AND {s}.digits(v_c.total - v_amount) <= 96;
        ELSIF v_c.secs < 0 THEN
            UPDATE {s}.counters SET total = greatest(v_c.total - v_amount, 0)
             WHERE id = v_c.id AND v_c.period = v_rec.wheres[v_n]
               AND {s}.digits(v_c.total - v_amount) <= 96;
        ELSE  -- exactly that entry, if it has not expired (or been refunded) meanwhile
            DELETE FROM {s}.entries
             WHERE counter = v_c.id AND seq = v_rec.wheres[v_n]::bigint;
            IF FOUND THEN
                SELECT e.at INTO v_at FROM {s}.entries e
                 WHERE e.counter = v_c.id ORDER BY e.seq LIMIT 1;
                IF FOUND THEN
                    UPDATE {s}.counters SET total = v_c.total - v_amount, head_at = v_at
                     WHERE id = v_c.id;
                ELSE
                    UPDATE {s}.counters SET total = NULL, head_at = NULL WHERE id = v_c.id;
                END IF;
            END IF;
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION {s}.peek(
    p_commits text[], p_now double precision,
    k_dim text[], k_scope text[], k_subject text[], k_win text[], k_bucket text[]
) RETURNS numeric[] LANGUAGE plpgsql AS $$
-- Each counter's total at p_now, changing no total. A rolling counter whose head has expired
-- is pruned, as a reserve would (else every peek would read those entries again), unless a
-- transaction holds its row: then it is only read, so a peek never waits for a lock.
DECLARE
    v_out numeric[] := '{}'; v_r record; v_e record; v_k integer; v_sum numeric;
    v_val numeric; v_total numeric; v_at double precision;
BEGIN
    IF cardinality(p_commits) > 0 THEN
        DELETE FROM {s}.pending WHERE id = ANY (p_commits);
    END IF;
    FOR v_k IN 1 .. cardinality(k_dim) LOOP
        SELECT c.id, c.secs, c.total, c.period, c.head_at INTO v_r FROM {s}.counters c
         WHERE c.dimension = k_dim[v_k] AND c.scope = k_scope[v_k]
           AND c.subject = k_subject[v_k] AND c.win = k_win[v_k];
        IF NOT FOUND OR v_r.total IS NULL THEN
            v_val := 0;
        ELSIF v_r.secs = 0 THEN
            v_val := v_r.total;
        ELSIF v_r.secs < 0 THEN
            v_val := CASE WHEN v_r.period COLLATE "C" >= k_bucket[v_k] THEN v_r.total
                          ELSE 0 END;
        ELSIF v_r.head_at + v_r.secs > p_now THEN
            v_val := v_r.total;
        ELSE
            SELECT c.total, c.head_at INTO v_total, v_at FROM {s}.counters c
             WHERE c.id = v_r.id FOR UPDATE SKIP LOCKED;
            IF FOUND THEN
                IF v_at + v_r.secs <= p_now THEN
                    SELECT p.total, p.head INTO v_total, v_at
                      FROM {s}.prune(v_r.id, v_r.secs, p_now, v_total) p;
                    UPDATE {s}.counters SET total = v_total, head_at = v_at WHERE id = v_r.id;
                END IF;
                v_out := v_out || coalesce(v_total, 0);
                CONTINUE;
            END IF;
            -- held by a reserve: what pruning the expired head would leave
            v_val := 0;
            v_sum := 0;
            FOR v_e IN SELECT e.at, e.amount FROM {s}.entries e
                        WHERE e.counter = v_r.id ORDER BY e.seq LOOP
                IF v_e.at + v_r.secs > p_now THEN
                    v_val := v_r.total - v_sum;
                    EXIT;
                END IF;
                v_sum := v_sum + v_e.amount;
            END LOOP;
        END IF;
        v_out := v_out || v_val;
    END LOOP;
    RETURN v_out;
END $$;

CREATE OR REPLACE FUNCTION {s}.adjust(
    p_commits text[], p_dim text, p_scope text, p_subject text, p_win text,
    p_secs integer, p_bucket text, p_delta numeric, p_now double precision
) RETURNS numeric LANGUAGE plpgsql AS $$
-- The operator's path: add p_delta; a refund stops at zero and at the amounts still pending.
DECLARE
    v_id bigint; v_total numeric; v_period text; v_at double precision;
    v_held_w text[] := '{}'; v_held_a numeric[] := '{}';
    v_cur numeric; v_new numeric; v_floor numeric; v_owed numeric; v_e record;
BEGIN
    IF cardinality(p_commits) > 0 THEN
        DELETE FROM {s}.pending WHERE id = ANY (p_commits);
    END IF;
    IF p_delta < 0 THEN  -- an expired record can no longer be released: its amount is free
        DELETE FROM {s}.pending WHERE expires_at <= p_now;
    END IF;
    SELECT c.id, c.total, c.period, c.head_at INTO v_id, v_total, v_period, v_at
      FROM {s}.counter(p_dim, p_scope, p_subject, p_win, p_secs) c;
    IF p_delta < 0 THEN
        SELECT coalesce(array_agg(u.w), '{}'), coalesce(array_agg(u.a), '{}')
          INTO v_held_w, v_held_a
          FROM {s}.pending q, unnest(q.counters, q.wheres, q.amounts) AS u(c, w, a)
         WHERE u.c = v_id;
    END IF;

    IF p_secs = 0 THEN
        v_cur := coalesce(v_total, 0);
        v_new := v_cur + p_delta;
        IF p_delta < 0 THEN
            v_floor := least(v_cur, (SELECT coalesce(sum(x), 0) FROM unnest(v_held_a) x));
            IF v_new <= v_floor THEN
                v_new := v_floor;
            END IF;
        END IF;
        UPDATE {s}.counters SET total = {s}.exact(v_new) WHERE id = v_id;
        RETURN v_new;
    END IF;

    IF p_secs < 0 THEN
        IF v_period IS NULL OR v_period COLLATE "C" < p_bucket THEN
            v_period := p_bucket;
            v_cur := 0;
        ELSE
            v_cur := v_total;
        END IF;
        v_new := v_cur + p_delta;
        IF p_delta < 0 THEN  -- only the amounts pending in this period count
            v_floor := least(v_cur, (SELECT coalesce(sum(h.a), 0)
                                       FROM unnest(v_held_w, v_held_a) AS h(w, a)
                                      WHERE h.w = v_period));
            IF v_new <= v_floor THEN
                v_new := v_floor;
            END IF;
        END IF;
        UPDATE {s}.counters SET total = {s}.exact(v_new), period = v_period WHERE id = v_id;
        RETURN v_new;
    END IF;

    -- Rolling: a positive delta is a new entry; a refund consumes the oldest entries first,
    -- leaving the pending ones for their release.
    IF v_at + p_secs <= p_now THEN
        SELECT p.total, p.head INTO v_total, v_at FROM {s}.prune(v_id, p_secs, p_now, v_total) p;
    END IF;
    v_cur := coalesce(v_total, 0);
    IF p_delta > 0 THEN
        v_cur := {s}.exact(v_cur + p_delta);
        INSERT INTO {s}.entries (counter, at, amount) VALUES (v_id, p_now, p_delta);
        v_total := v_cur;
        v_at := coalesce(v_at, p_now);
    ELSIF p_delta < 0 AND v_at IS NOT NULL THEN
        v_owed := -p_delta;
        FOR v_e IN SELECT e.seq, e.amount FROM {s}.entries e
                    WHERE e.counter = v_id ORDER BY e.seq LOOP
            EXIT WHEN v_owed = 0;
            CONTINUE WHEN v_e.seq::text = ANY (v_held_w);
            IF v_e.amount > v_owed THEN
                UPDATE {s}.entries SET amount = amount - v_owed
                 WHERE counter = v_id AND seq = v_e.seq;
                v_owed := 0;
            ELSE
                v_owed := v_owed - v_e.amount;
                DELETE FROM {s}.entries WHERE counter = v_id AND seq = v_e.seq;
            END IF;
        END LOOP;
        v_cur := v_cur - (-p_delta - v_owed);
        SELECT e.at INTO v_at FROM {s}.entries e WHERE e.counter = v_id ORDER BY e.seq LIMIT 1;
        IF FOUND THEN
            v_total := v_cur;
        ELSE
            v_total := NULL;
            v_at := NULL;
        END IF;
    ELSIF v_at IS NULL THEN
        v_cur := 0;
    END IF;
    UPDATE {s}.counters SET total = v_total, head_at = v_at WHERE id = v_id;
    RETURN v_cur;
END $$;

CREATE OR REPLACE FUNCTION {s}.totals(
    p_commits text[], p_now double precision,
    p_hour text, p_day text, p_week text, p_month text
) RETURNS TABLE (o_dim text, o_scope text, o_subject text, o_win text, o_total numeric)
LANGUAGE plpgsql AS $$
-- Every live total: expired calendar periods and rolling entries left out.
BEGIN
    IF cardinality(p_commits) > 0 THEN
        DELETE FROM {s}.pending WHERE id = ANY (p_commits);
    END IF;
    RETURN QUERY
    SELECT c.dimension::text, c.scope::text, c.subject::text, c.win::text, c.total
      FROM {s}.counters c
     WHERE c.total IS NOT NULL
       AND (c.secs = 0
            OR (c.secs < 0 AND c.period >= CASE c.win WHEN 'hour' THEN p_hour
                                                      WHEN 'day' THEN p_day
                                                      WHEN 'week' THEN p_week
                                                      ELSE p_month END))
    UNION ALL
    SELECT c.dimension::text, c.scope::text, c.subject::text, c.win::text, sum(e.amount)
      FROM {s}.counters c JOIN {s}.entries e ON e.counter = c.id
     WHERE c.secs > 0
       AND e.seq >= (SELECT min(f.seq) FROM {s}.entries f
                      WHERE f.counter = c.id AND f.at + c.secs > p_now)
     GROUP BY c.id;
END $$;

CREATE OR REPLACE FUNCTION {s}.pending_list(p_commits text[], p_now double precision)
RETURNS TABLE (o_id text, o_created double precision, o_expires double precision,
               o_owner text, o_keys text[], o_amounts numeric[])
LANGUAGE plpgsql AS $$
-- Drop every expired record, then list the live ones, oldest first.
BEGIN
    IF cardinality(p_commits) > 0 THEN
        DELETE FROM {s}.pending WHERE id = ANY (p_commits);
    END IF;
    DELETE FROM {s}.pending WHERE expires_at <= p_now;
    RETURN QUERY
    SELECT q.id::text, q.created_at, q.expires_at, q.owner, x.keys, x.amounts
      FROM {s}.pending q
      LEFT JOIN LATERAL (
           SELECT array_agg(ARRAY[c.dimension, c.scope, c.subject, c.win]::text[]
                            ORDER BY u.n) AS keys,
                  array_agg(u.a ORDER BY u.n) AS amounts
             FROM unnest(q.counters, q.amounts) WITH ORDINALITY AS u(cid, a, n)
             JOIN {s}.counters c ON c.id = u.cid) x ON true
     ORDER BY q.seq;
END $$;

CREATE OR REPLACE FUNCTION {s}.reset(p_commits text[], p_dim text) RETURNS void
LANGUAGE plpgsql AS $$
-- Forget every total (of one dimension) and the pending amounts on them.
DECLARE
    v_gone bigint[];
BEGIN
    IF cardinality(p_commits) > 0 THEN
        DELETE FROM {s}.pending WHERE id = ANY (p_commits);
    END IF;
    IF p_dim IS NULL THEN
        DELETE FROM {s}.pending;
        DELETE FROM {s}.entries;
        DELETE FROM {s}.counters;
        RETURN;
    END IF;
    SELECT coalesce(array_agg(x.id), '{}') INTO v_gone
      FROM (SELECT c.id FROM {s}.counters c WHERE c.dimension = p_dim
             ORDER BY c.scope, c.subject, c.win FOR UPDATE) x;
    IF cardinality(v_gone) = 0 THEN
        RETURN;
    END IF;
    DELETE FROM {s}.pending WHERE counters <@ v_gone AND cardinality(counters) > 0;
    UPDATE {s}.pending q SET counters = k.c, wheres = k.w, amounts = k.a
      FROM (SELECT r.id, array_agg(u.c ORDER BY u.n) AS c, array_agg(u.w ORDER BY u.n) AS w,
                   array_agg(u.a ORDER BY u.n) AS a
              FROM {s}.pending r,
                   unnest(r.counters, r.wheres, r.amounts) WITH ORDINALITY AS u(c, w, a, n)
             WHERE r.counters && v_gone AND NOT u.c = ANY (v_gone)
             GROUP BY r.id) k
     WHERE q.id = k.id;
    DELETE FROM {s}.entries WHERE counter = ANY (v_gone);
    DELETE FROM {s}.counters WHERE id = ANY (v_gone);
END $$;
"""

FUNCTIONS_DIGEST = hashlib.sha256(_FUNCTIONS.encode()).hexdigest()[:16]
"""Kept in ``meta``: a schema whose functions differ from this module's gets them again."""

_MIGRATIONS: dict[int, str] = {1: _TABLES}
"""The DDL that takes the schema from version ``n - 1`` to ``n`` (the functions follow)."""


# --- connections: bounded waits, shared pools -----------------------------------------------


class _Connection(psycopg.Connection[tuple[Any, ...]]):
    """A connection whose every wait for the server ends after ``wait_limit`` seconds."""

    wait_limit: float | None = None

    def wait(self, gen: PQGen[_R], interval: float = 0.1, timeout: float | None = None) -> _R:
        return super().wait(gen, interval, self.wait_limit if timeout is None else timeout)


class _AsyncConnection(psycopg.AsyncConnection[tuple[Any, ...]]):
    """:class:`_Connection` for asyncio."""

    wait_limit: float | None = None

    async def wait(
        self,
        gen: PQGen[_R],
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109 - psycopg's signature
    ) -> _R:
        return await super().wait(gen, interval, self.wait_limit if timeout is None else timeout)


class _Settings(NamedTuple):
    """How to connect. Stores with equal settings share their pools (one per process and
    event loop): every statement names its schema, so a connection serves any schema."""

    dsn: str
    where: str  # host:port, for messages
    password: str  # to scrub from messages
    connect_timeout: float
    timeout: float
    max_connections: int

    def kwargs(self) -> dict[str, Any]:
        # libpq counts whole seconds, and at least 2.
        return {"autocommit": True, "connect_timeout": max(2, math.ceil(self.connect_timeout))}

    def session(self) -> tuple[str, tuple[str]]:
        """Each new connection's setup: the statement timeout; durable commits."""
        return (
            "SELECT set_config('statement_timeout', %s, false), "
            "CASE WHEN current_setting('synchronous_commit') = 'off' "
            "THEN set_config('synchronous_commit', 'on', false) END",
            (f"{round(self.timeout * 1000)}ms",),
        )

    def scrub(self, message: str) -> str:
        return message.replace(self.password, "***") if self.password else message

    def unreachable(self, exc: BaseException) -> StateStoreError:
        return StateStoreError(
            self.scrub(f"PostgreSQL at {self.where} is unreachable: {_reason(exc)}")
        )

    @property
    def wait_limit(self) -> float:
        """How long the client waits for an answer: the server's statement_timeout has
        the first say (the connection stays usable), this catches a server that hangs."""
        return self.timeout + _MARGIN

    def exhausted(self, stats: dict[str, int]) -> StateStoreError:
        """No connection within ``timeout``: all in use, or none could be made in time."""
        if stats.get("pool_size", 0) >= self.max_connections:
            return StateStoreError(
                f"PostgreSQL at {self.where}: no connection free after {self.timeout:g} s "
                f"(all {self.max_connections} in use)"
            )
        return StateStoreError(
            f"PostgreSQL at {self.where} is unreachable: no connection made within "
            f"{self.timeout:g} s"
        )


class _Failure(NamedTuple):
    at: float  # time.monotonic()
    error: BaseException


class _Pool(ConnectionPool[_Connection]):
    """The sync pool: remembers why its last connect failed, so a caller learns it at once."""

    def __init__(self, settings: _Settings) -> None:
        super().__init__(
            settings.dsn,
            connection_class=_Connection,
            kwargs=settings.kwargs(),
            min_size=1,
            max_size=settings.max_connections,
            open=False,
            configure=self._configure,
            name=f"limenex@{settings.where}",
            timeout=settings.timeout,
            reconnect_timeout=0.0,  # report a failed connect now; the next call tries again
        )
        self.settings = settings
        self.failure: _Failure | None = None
        self.users = 0

    def _configure(self, conn: _Connection) -> None:
        # The client's own limit leaves the server's statement_timeout the first say.
        conn.wait_limit = self.settings.wait_limit
        conn.execute(*self.settings.session())

    def _connect(self, timeout: float | None = None) -> _Connection:
        try:
            conn = super()._connect(timeout)
        except Exception as exc:
            self.failure = _Failure(time.monotonic(), exc)
            raise
        self.failure = None
        return conn

    def lease(self) -> _Connection:
        """A connection; a failed connect is reported at once, with its reason."""
        settings = self.settings
        start = time.monotonic()
        while True:
            left = start + settings.timeout - time.monotonic()
            try:
                return self.getconn(timeout=max(min(_SLICE, left), 0.001))
            except PoolTimeout:
                failure = self.failure
                if failure is not None and failure.at >= start:
                    raise settings.unreachable(failure.error) from failure.error
                if left <= _SLICE:
                    raise settings.exhausted(self.get_stats()) from None


class _AsyncPool(AsyncConnectionPool[_AsyncConnection]):
    """:class:`_Pool` for one event loop."""

    def __init__(self, settings: _Settings) -> None:
        super().__init__(
            settings.dsn,
            connection_class=_AsyncConnection,
            kwargs=settings.kwargs(),
            min_size=1,
            max_size=settings.max_connections,
            open=False,
            configure=self._configure,
            name=f"limenex@{settings.where}",
            timeout=settings.timeout,
            reconnect_timeout=0.0,
        )
        self.settings = settings
        self.failure: _Failure | None = None
        self.users = 0
        self.opening: asyncio.Task[None] | None = None

    async def _configure(self, conn: _AsyncConnection) -> None:
        conn.wait_limit = self.settings.wait_limit
        await conn.execute(*self.settings.session())

    async def _connect(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - psycopg_pool's signature
    ) -> _AsyncConnection:
        try:
            conn = await super()._connect(timeout)
        except asyncio.CancelledError:
            # The worker connecting is cancelled: its loop shuts down (asyncio.run cancels every
            # task, then waits for them all). psycopg_pool's worker takes that for a failed
            # connect and waits for more work, for ever (a hung server keeps it connecting for
            # up to connect_timeout). Cancelled again, it ends at that wait.
            task = asyncio.current_task()
            if task is not None:
                task.cancel()
            raise
        except Exception as exc:
            self.failure = _Failure(time.monotonic(), exc)
            raise
        self.failure = None
        return conn

    async def lease(self) -> _AsyncConnection:
        if self.opening is None:
            self.opening = asyncio.get_running_loop().create_task(self.open(wait=False))
        await asyncio.shield(self.opening)
        settings = self.settings
        start = time.monotonic()
        while True:
            left = start + settings.timeout - time.monotonic()
            try:
                return await self.getconn(timeout=max(min(_SLICE, left), 0.001))
            except PoolTimeout:
                failure = self.failure
                if failure is not None and failure.at >= start:
                    raise settings.unreachable(failure.error) from failure.error
                if left <= _SLICE:
                    raise settings.exhausted(self.get_stats()) from None

    def abandon(self) -> None:
        """Close the sockets of a pool whose event loop has stopped (it cannot be awaited)."""
        with contextlib.suppress(Exception):
            for conn in list(self._pool):
                conn.pgconn.finish()
            self._pool.clear()
        self._closed = True


class _QuietConnectFailures(logging.Filter):
    """Drops psycopg_pool's warnings about our pools' failed connects: each call that needs
    a connection reports that failure itself, as a StateStoreError naming the server."""

    MESSAGES = frozenset(
        {"error connecting in %r: %s", "reconnection attempt in pool %r failed after %s sec"}
    )

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.msg in self.MESSAGES
            and isinstance(args, tuple)
            and str(args[0]).startswith("limenex@")
        )


logging.getLogger("psycopg.pool").addFilter(_QuietConnectFailures())


class _Pools:
    """The pools of this process, shared by the stores with equal settings."""

    lock = threading.Lock()
    sync: ClassVar[dict[_Settings, _Pool]] = {}
    loops: ClassVar[dict[tuple[asyncio.AbstractEventLoop, _Settings], _AsyncPool]] = {}

    @classmethod
    def forget(cls) -> None:
        """In a forked child: the parent's pools, their threads and sockets are not ours."""
        cls.lock = threading.Lock()
        cls.sync, cls.loops = {}, {}

    @classmethod
    def take(cls, settings: _Settings) -> _Pool:
        with cls.lock:
            pool = cls.sync.get(settings)
            if pool is None:
                pool = cls.sync[settings] = _Pool(settings)
                pool.open(wait=False)
            pool.users += 1
            return pool

    @classmethod
    def give_back(cls, pool: _Pool) -> None:
        with cls.lock:
            pool.users -= 1
            if pool.users > 0:
                return
            if cls.sync.get(pool.settings) is pool:
                del cls.sync[pool.settings]
        with contextlib.suppress(Exception):
            pool.close(timeout=pool.settings.timeout)

    @classmethod
    def take_async(cls, loop: asyncio.AbstractEventLoop, settings: _Settings) -> _AsyncPool:
        with cls.lock:
            for key in [key for key in cls.loops if key[0].is_closed()]:
                cls.loops.pop(key).abandon()  # that loop's tasks and sockets are gone
            pool = cls.loops.get((loop, settings))
            if pool is None:
                pool = cls.loops[loop, settings] = _AsyncPool(settings)
            pool.users += 1
            return pool

    @classmethod
    def give_back_async(cls, loop: asyncio.AbstractEventLoop, pool: _AsyncPool) -> bool:
        """Whether ``pool`` has no user left (the caller then closes it)."""
        with cls.lock:
            pool.users -= 1
            if pool.users > 0:
                return False
            if cls.loops.get((loop, pool.settings)) is pool:
                del cls.loops[loop, pool.settings]
            return True


# --- requests -------------------------------------------------------------------------------


class _Item:
    """One reservation to make: its checks, validated and resolved to counters."""

    __slots__ = ("amounts", "buckets", "checks", "keys", "now", "rid", "secs")

    def __init__(self, rid: str, now: float) -> None:
        self.rid = rid
        self.now = now
        self.keys: list[CounterKey] = []  # distinct, first-named first
        self.secs: list[int] = []
        self.amounts: list[Decimal] = []
        self.buckets: list[str | None] = []
        self.checks: list[tuple[int, str, Decimal]] = []  # (index into keys, op, limit)


def _texts(values: Iterable[str | None]) -> str:
    """A PostgreSQL array literal of text values (NULL for ``None``)."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


def _plain(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of numbers (``str`` of ints, floats, Decimals)."""
    return "{" + ",".join(map(str, values)) + "}"


def _parse(text: str, items: Sequence[_Item]) -> list[Reservation | StateBreach]:
    """The reserve function's answer: one line per reservation."""
    lines = text.split("\n")
    if len(lines) != len(items) or not all(lines):
        raise ValueError(f"the reserve function answered {text[:200]!r}")
    outcomes: list[Reservation | StateBreach] = []
    for item, line in zip(items, lines, strict=True):
        if line[0] == "+":
            observed = tuple(map(Decimal, line[1:].split(","))) if len(line) > 1 else ()
            outcomes.append(Reservation(item.rid, observed, None))
        else:
            position, observed_total, projected = line[1:].split(",")
            outcomes.append(StateBreach(int(position), Decimal(observed_total), Decimal(projected)))
    return outcomes


def _utf8(text: str) -> bool:
    """Whether UTF-8 can carry ``text`` (not when it holds an unpaired surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _positive(name: str, value: float) -> float:
    if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
        raise LimenexConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _reason(exc: BaseException) -> str:
    """The gist of a driver error: its first line, without libpq's preamble."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    if "failed: " in text:  # 'connection to server at "h", port 1 failed: Connection refused'
        text = text.rsplit("failed: ", 1)[1]
    return text or type(exc).__name__


# --- the store ------------------------------------------------------------------------------


def parse_dsn(dsn: object) -> dict[str, Any]:
    """The connection parameters of a DSN; a bad one is a clear, password-free config error."""
    if not isinstance(dsn, str):
        raise LimenexConfigError(f"the PostgreSQL DSN must be a string, got {type(dsn).__name__}")
    try:
        return dict(conninfo_to_dict(dsn))
    except psycopg.Error:  # its message may quote the DSN, password included
        raise LimenexConfigError(
            "invalid PostgreSQL DSN: write postgresql://user@host:5432/database"
        ) from None


class PostgresStateStore(StateStore):
    """Totals in a PostgreSQL schema, shared by every process that uses it.

    ``dsn`` is a ``postgresql://`` (or ``postgres://``) URL or a libpq connection string.
    ``schema`` holds the store's tables and functions (letters, digits and ``_``; made on
    first use or by :meth:`migrate`). ``connect_timeout`` bounds a connection attempt (libpq
    counts whole seconds, at least 2), ``timeout`` each statement. Stores of one process
    with the same DSN and settings share their connections: at most ``max_connections``
    for threads, and as many for each event loop that uses the async methods.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "limenex",
        lease_seconds: float = 300.0,
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
        max_connections: int = 20,
    ) -> None:
        self.lease_seconds = _positive("lease_seconds", lease_seconds)
        if type(max_connections) is not int or max_connections < 1:
            raise LimenexConfigError(
                f"max_connections must be a positive integer, got {max_connections!r}"
            )
        if (
            not isinstance(schema, str)
            or not _SCHEMA_NAME.fullmatch(schema)
            or len(schema) > 63
            or schema.lower().startswith("pg_")
        ):
            raise LimenexConfigError(
                f"invalid PostgreSQL schema name {schema!r}: use 1 to 63 letters, digits and "
                "underscores, not starting with a digit or pg_"
            )
        self.schema = schema
        self.dsn = dsn  # for stores kept beside this one (approvals): same database and schema
        self._schema_checked = False  # migrate() ran once for this store: version and functions
        params = parse_dsn(dsn)
        host = str(params.get("host") or params.get("hostaddr") or "localhost")
        self._settings = _Settings(
            dsn=dsn,
            where=f"{host}:{params.get('port') or 5432}",
            password=str(params.get("password") or ""),
            connect_timeout=_positive("connect_timeout", connect_timeout),
            timeout=_positive("timeout", timeout),
            max_connections=max_connections,
        )
        self.where = self._settings.where
        """``host:port`` of the server, for messages."""
        self._name = f"{params.get('user', '')}@{self.where}/{params.get('dbname', '')}"

        # The name is letters, digits and underscores, and quoted too.
        q = self._q = sql.Identifier(schema).as_string()

        def query(text: str) -> str:
            return text.replace("{s}", q)

        self._sql_reserve = query(
            "SELECT {s}.reserve(%s::text[], %s, %s, %s, %s, %s::text[], %s::text[], "
            "%s::text[], %s::text[], %s::integer[], %s::text[], %s::float8[], %s::integer[], "
            "%s::integer[], %s::integer[], %s::numeric[], %s::text[], %s::integer[], "
            "%s::text[], %s::numeric[])"
        )
        self._sql_settle = query("SELECT {s}.settle(%s::text[])")
        self._sql_release = query("SELECT {s}.release(%s::text[], %s, %s)")
        self._sql_peek = query(
            "SELECT {s}.peek(%s::text[], %s, %s::text[], %s::text[], %s::text[], %s::text[], "
            "%s::text[])"
        )
        self._sql_adjust = query("SELECT {s}.adjust(%s::text[], %s, %s, %s, %s, %s, %s, %s, %s)")
        self._sql_totals = query("SELECT * FROM {s}.totals(%s::text[], %s, %s, %s, %s, %s)")
        self._sql_pending = query("SELECT * FROM {s}.pending_list(%s::text[], %s)")
        self._sql_reset = query("SELECT {s}.reset(%s::text[], %s)")
        self._sql_version = query("SELECT value FROM {s}.meta WHERE name = 'version'")
        self._sql_digest = query("SELECT value FROM {s}.meta WHERE name = 'functions'")
        self._sql_set_digest = query(
            "INSERT INTO {s}.meta VALUES ('functions', %s) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
        )
        self._sql_set_version = query(
            "INSERT INTO {s}.meta VALUES ('version', %s) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
        )

        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        # Ids: a random prefix of this store object and a counter. Unique across processes,
        # and made here, so that a retried reserve can find its first attempt.
        self._prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._commits = CommitQueue()
        self._windows: dict[str, Window] = {}
        self._buckets: dict[str, tuple[float, float, str]] = {}
        self._lock = threading.Lock()
        self._pool: _Pool | None = None
        self._sides: dict[asyncio.AbstractEventLoop, _AsyncSide] = {}
        _STORES.add(self)

    def _forked(self) -> None:
        """In a forked child: new ids and owner, and connections of its own."""
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._prefix = secrets.token_hex(8)
        self._commits = CommitQueue()  # the parent sends its own
        self._lock = threading.Lock()
        self._pool = None
        self._sides = {}

    def __repr__(self) -> str:
        return f"PostgresStateStore({self._name!r}, schema={self.schema!r})"

    # --- the contract, sync -----------------------------------------------------------------

    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        items = [self._item(checks, now)]
        return self._call(
            "reserve", lambda conn, retry: self._reserve(conn, items, retry), retry=True
        )[0]

    def commit(self, reservation: Reservation) -> None:
        if self._commits.add(reservation.id):
            self._send(self._sql_settle, lambda commits: (commits,), "commit")

    def release(self, reservation: Reservation, now: float) -> None:
        self._send(self._sql_release, lambda c: (c, reservation.id, now), "release")

    def peek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        params = self._peek_params(checks, now)
        row = self._send(self._sql_peek, lambda c: (c, now, *params), "peek")
        return tuple(row[0])

    def adjust(
        self, key: CounterKey, delta: Decimal, now: float, window: Window | None = None
    ) -> Decimal:
        if not isinstance(delta, Decimal) or not delta.is_finite():
            raise StateStoreError(f"amount {delta} is not a finite number")
        secs, bucket = self._kind(self._window(key, window), now)
        row = self._send(
            self._sql_adjust,
            lambda c: (c, key[0], key[1], key[2], key[3], secs, bucket, delta, now),
            "adjust",
            retry=False,  # not idempotent: never sent twice
        )
        return Decimal(row[0])

    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        buckets = [Window.parse(unit).bucket(now) for unit in CALENDAR_UNITS]
        rows = self._send(self._sql_totals, lambda c: (c, now, *buckets), "totals", rows=True)
        return [(CounterKey(d, s, sub, w), Decimal(t)) for d, s, sub, w, t in rows]

    def pending(self, now: float) -> list[PendingReservation]:
        rows = self._send(self._sql_pending, lambda c: (c, now), "pending", rows=True)
        return [_pending(row) for row in rows]

    def reset(self, dimension: str | None = None) -> None:
        self._send(self._sql_reset, lambda c: (c, dimension), "reset")

    def migrate(self) -> None:
        """Create the schema, or upgrade it to this version; nothing if it is up to date.

        Safe to run from several processes at once: a transaction-scoped advisory lock
        serialises them, and each finds the work of the one before done.
        """
        self._call("migrate", lambda conn, retry: self._migrate(conn), retry=True, make=False)

    def close(self) -> None:
        """Send the queued commits; let go of the sync pool and of every loop's pool.

        Commits that cannot be sent (the server is down) are logged and dropped: their
        records expire with their lease, their amounts counted, as a commit leaves them.
        """
        try:
            if len(self._commits):
                self._send(self._sql_settle, lambda commits: (commits,), "commit")
        except StateStoreError as exc:
            _log.warning("limenex: %d commits not sent on close: %s", len(self._commits), exc)
        finally:
            with self._lock:
                pool, self._pool = self._pool, None
                sides, self._sides = list(self._sides.values()), {}
            if pool is not None:
                _Pools.give_back(pool)
            for side in sides:
                side.close_from_outside()

    # --- the contract, async ----------------------------------------------------------------

    async def areserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        item = self._item(checks, now)
        return await self._side().reserve(item)

    async def acommit(self, reservation: Reservation) -> None:
        if self._commits.add(reservation.id):
            await self._side().send(self._sql_settle, lambda commits: (commits,), "commit")

    async def arelease(self, reservation: Reservation, now: float) -> None:
        await self._side().send(self._sql_release, lambda c: (c, reservation.id, now), "release")

    async def apeek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        params = self._peek_params(checks, now)
        row = await self._side().send(self._sql_peek, lambda c: (c, now, *params), "peek")
        return tuple(row[0])

    async def aclose(self) -> None:
        """Send the queued commits and close this loop's pool, then let go of the rest."""
        loop = asyncio.get_running_loop()
        with self._lock:
            side = self._sides.pop(loop, None)
        try:
            if side is not None:
                try:
                    if len(self._commits):
                        await side.send(self._sql_settle, lambda commits: (commits,), "commit")
                except StateStoreError:
                    pass  # close() tries once more, and logs
                finally:
                    await side.aclose()
        finally:
            await asyncio.to_thread(self.close)

    # --- reservations -------------------------------------------------------------------------

    def _item(self, checks: Sequence[Check], now: float) -> _Item:
        """Validate ``checks`` as the reference ledger does, and resolve their counters."""
        item = _Item(f"{self._prefix}-{next(self._ids)}", now)
        keys = item.keys
        for check in checks:
            key = check.key
            if check.op not in OPERATORS:
                raise StateStoreError(f"unknown operator {check.op!r}")
            # Decimal refuses to order NaN; PostgreSQL sorts it above every number (an ALLOW).
            if check.limit.is_nan() and (check.op not in ("eq", "neq") or check.limit.is_snan()):
                raise StateStoreError(f"cannot compare a total with the limit {check.limit}")
            if key in keys:  # a key named again: its first amount counts, once
                item.checks.append((keys.index(key), check.op, check.limit))
                continue
            amount = check.amount
            if (amount.is_signed() or not amount.is_finite()) and (
                not amount.is_finite() or amount < 0
            ):
                raise StateStoreError(f"amount {amount} is not a finite, non-negative number")
            for text in key:  # refused here, not in a batch where it would fail the others too
                if "\x00" in text or not (text.isascii() or _utf8(text)):
                    raise StateStoreError(
                        f"PostgreSQL at {self.where} cannot store the counter name "
                        f"{text[:40]!r}: it holds a NUL or an unpaired surrogate"
                    )
            secs, bucket = self._kind(self._window(key, check.window), now)
            item.checks.append((len(keys), check.op, check.limit))
            keys.append(key)
            item.secs.append(secs)
            item.amounts.append(amount)
            item.buckets.append(bucket)
        return item

    def _window(self, key: CounterKey, window: Window | None) -> Window | None:
        """The window of ``key``, checked as every store checks it (parsed specs cached)."""
        return counter_window(key, window, self._parsed)

    def _parsed(self, spec: str) -> Window:
        found = self._windows.get(spec)
        if found is None:
            found = self._windows[spec] = Window.parse(spec)
        return found

    def _kind(self, window: Window | None, now: float) -> tuple[int, str | None]:
        """``(secs, bucket)``: 0 without a window, -1 and the period for a calendar one."""
        if window is None:
            return 0, None
        if window.seconds is not None:
            return window.seconds, None
        cached = self._buckets.get(window.spec)
        if cached is not None and cached[0] < now < cached[1]:
            return -1, cached[2]
        name = window.bucket(now)
        # Every period is made of whole UTC hours: the name holds for this hour (a
        # microsecond clear of its edges, where Window.bucket's own rounding decides).
        hour = now // 3600 * 3600
        self._buckets[window.spec] = (hour + 1e-6, hour + 3600 - 1e-6, name)
        return -1, name

    def _reserve_params(
        self, commits: list[str], items: Sequence[_Item], retry: bool
    ) -> tuple[object, ...]:
        """The reserve function's arguments for a batch (see its comments)."""
        if len(items) == 1 and len(items[0].keys) == 1:  # the common case
            order: list[CounterKey] = items[0].keys
            secs: list[int] = items[0].secs
            index = {order[0]: 1}
        else:
            kinds: dict[CounterKey, int] = {}
            for item in items:
                for key, kind in zip(item.keys, item.secs, strict=True):
                    kinds.setdefault(key, kind)
            order = sorted(kinds)  # the canonical lock order
            secs = [kinds[key] for key in order]
            index = {key: n for n, key in enumerate(order, 1)}
        a_key: list[int] = []
        a_amount: list[Decimal] = []
        a_bucket: list[str | None] = []
        c_amt: list[int] = []
        c_op: list[str] = []
        c_limit: list[Decimal] = []
        for item in items:
            first = len(a_key) + 1
            a_key += [index[key] for key in item.keys]
            a_amount += item.amounts
            a_bucket += item.buckets
            for position, op, limit in item.checks:
                c_amt.append(first + position)
                c_op.append(op)
                c_limit.append(limit)
        return (
            _texts(commits),
            self._owner,
            self.lease_seconds,
            retry,
            max(item.now for item in items),
            _texts([key[0] for key in order]),
            _texts([key[1] for key in order]),
            _texts([key[2] for key in order]),
            _texts([key[3] for key in order]),
            _plain(secs),
            _texts([item.rid for item in items]),
            _plain([repr(item.now) for item in items]),
            _plain([len(item.keys) for item in items]),
            _plain([len(item.checks) for item in items]),
            _plain(a_key),
            _plain(a_amount),
            _texts(a_bucket),
            _plain(c_amt),
            _texts(c_op),
            _plain(c_limit),
        )

    def _reserve(
        self, conn: _Connection, items: Sequence[_Item], retry: bool
    ) -> list[Reservation | StateBreach]:
        commits = self._commits.take()
        try:
            row = conn.execute(
                self._sql_reserve, self._reserve_params(commits, items, retry)
            ).fetchone()
        except BaseException:
            self._commits.put_back(commits)
            raise
        return _parse(row[0] if row else "", items)

    async def _areserve(
        self, conn: _AsyncConnection, items: Sequence[_Item], retry: bool
    ) -> list[Reservation | StateBreach]:
        commits = self._commits.take()
        try:
            cursor = await conn.execute(
                self._sql_reserve, self._reserve_params(commits, items, retry)
            )
            row = await cursor.fetchone()
        except BaseException:
            self._commits.put_back(commits)
            raise
        return _parse(row[0] if row else "", items)

    # --- other operations ---------------------------------------------------------------------

    def _peek_params(self, checks: Sequence[Check], now: float) -> tuple[str, ...]:
        buckets = [self._kind(self._window(c.key, c.window), now)[1] for c in checks]
        return (
            _texts([c.key[0] for c in checks]),
            _texts([c.key[1] for c in checks]),
            _texts([c.key[2] for c in checks]),
            _texts([c.key[3] for c in checks]),
            _texts(buckets),
        )

    def _send(
        self,
        query: str,
        params: Callable[[str], tuple[object, ...]],
        what: str,
        *,
        retry: bool = True,
        rows: bool = False,
    ) -> Any:
        """Run one statement whose first argument is the queued commits."""

        def run(conn: _Connection, retrying: bool) -> Any:
            commits = self._commits.take()
            try:
                cursor = conn.execute(query, params(_texts(commits)))
                return cursor.fetchall() if rows else cursor.fetchone()
            except BaseException:
                self._commits.put_back(commits)
                raise

        return self._call(what, run, retry=retry)

    def _migrate(self, conn: _Connection) -> None:
        q = self._q
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, q))
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{q}.meta",)).fetchone()
            version = 0
            if row is not None and row[0]:
                value = conn.execute(self._sql_version).fetchone()
                version = int(value[0]) if value is not None else 0
            if version > SCHEMA_VERSION:
                raise StateStoreError(
                    f"PostgreSQL at {self.where}: schema {self.schema!r} is at version "
                    f"{version}, made by a newer Limenex (this one knows {SCHEMA_VERSION})"
                )
            digest = None
            if version == SCHEMA_VERSION:
                value = conn.execute(self._sql_digest).fetchone()
                digest = value[0] if value is not None else None
            if version < SCHEMA_VERSION or digest != FUNCTIONS_DIGEST:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    conn.execute(_MIGRATIONS[step].replace("{s}", q).encode())
                conn.execute(_FUNCTIONS.replace("{s}", q).encode())
                conn.execute(self._sql_set_version, (str(SCHEMA_VERSION),))
                conn.execute(self._sql_set_digest, (FUNCTIONS_DIGEST,))

    # --- connections and errors ---------------------------------------------------------------

    def _sync_pool(self) -> _Pool:
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = _Pools.take(self._settings)
        return pool

    def _call(
        self,
        what: str,
        run: Callable[[_Connection, bool], _T],
        *,
        retry: bool,
        make: bool = True,
    ) -> _T:
        """``run(conn, retrying)`` on a pooled connection, every error mapped.

        A broken connection is replaced and, with ``retry`` (the operation is idempotent),
        the operation sent again; a deadlock is retried; a missing schema is made (``make``).
        """
        if make and not self._schema_checked:
            self.migrate()  # once per store: creates, upgrades, or only checks the version
            self._schema_checked = True
        attempts = 0
        while True:
            attempts += 1
            pool = self._sync_pool()
            try:
                conn = pool.lease()
            except PoolClosed:  # closed by another thread meanwhile
                raise StateStoreError(f"PostgreSQL at {self.where}: the store is closed") from None
            action = "raise"
            try:
                return run(conn, attempts > 1)
            except psycopg.Error as exc:
                action = self._triage(exc, conn, retry, attempts, make)
                if action == "raise":
                    raise self._error(what, exc) from exc
            except (StateStoreError, LimenexConfigError):
                raise
            except Exception as exc:
                raise self._error(what, exc) from exc
            finally:
                with contextlib.suppress(Exception):
                    pool.putconn(conn)
            if action == "check":
                with contextlib.suppress(Exception):
                    pool.check()  # drop the other connections the server closed
            elif action == "migrate":
                self.migrate()

    def _triage(
        self,
        exc: psycopg.Error,
        conn: psycopg.BaseConnection[Any],
        retry: bool,
        attempts: int,
        make: bool,
    ) -> str:
        """``"raise"``, or what to do before trying again."""
        if isinstance(exc, pg_errors._WaitTimeout):  # a hung server: the query may still run
            with contextlib.suppress(Exception):
                conn.pgconn.finish()
            return "raise"
        state = exc.sqlstate
        if state in _RETRY_STATES and attempts < 5:
            return "again"
        if state in _MISSING_STATES and make and attempts < 3:
            return "migrate"
        if conn.broken and retry and attempts < 3:
            return "check"
        return "raise"

    def _error(self, what: str, exc: BaseException) -> StateStoreError:
        """A StateStoreError an operator can act on (never with the password)."""
        sqlstate = getattr(exc, "sqlstate", None)
        reason = _reason(exc)
        if sqlstate == _NUMERIC_OVERFLOW:
            message = f"cannot keep an exact total: {reason}"
        elif isinstance(exc, pg_errors._WaitTimeout | pg_errors.QueryCanceled):
            settings = self._settings
            limit = settings.wait_limit if isinstance(exc, pg_errors._WaitTimeout) else None
            message = (
                f"PostgreSQL at {self.where} did not answer within "
                f"{limit or settings.timeout:g} s ({what})"
            )
        elif isinstance(exc, psycopg.OperationalError) and (
            sqlstate is None or sqlstate[:2] in ("08", "57")
        ):
            message = f"PostgreSQL at {self.where} is unreachable: {reason}"
        else:
            message = f"PostgreSQL at {self.where}: {what} failed: {reason}"
        return StateStoreError(self._settings.scrub(message))

    def _side(self) -> _AsyncSide:
        """This event loop's batcher and pool, made on first use."""
        loop = asyncio.get_running_loop()
        side = self._sides.get(loop)
        if side is None:
            with self._lock:
                for gone in [gone for gone in self._sides if gone.is_closed()]:
                    self._sides.pop(gone).close_from_outside()
                side = self._sides.get(loop)
                if side is None:
                    side = self._sides[loop] = _AsyncSide(self, loop)
        return side


_STORES: weakref.WeakSet[PostgresStateStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _Pools.forget()
    for store in list(_STORES):
        store._forked()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pending(row: tuple[Any, ...]) -> PendingReservation:
    rid, created, expires, owner, keys, amounts = row
    pairs = tuple(
        (CounterKey(*key), Decimal(amount))
        for key, amount in zip(keys or (), amounts or (), strict=True)
    )
    return PendingReservation(rid, created, expires, pairs, owner)


class _AsyncSide:
    """One store's reserve batcher on one event loop, and the loop's shared pool.

    Reserves wait in ``queue``; at most ``_LANES`` statements are in flight. A statement
    takes every reserve queued when it starts (up to ``_MAX_BATCH``), so under load one
    round trip serves many calls, and a call waits at most for the statement in flight
    before its own.
    """

    def __init__(self, store: PostgresStateStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.pool = _Pools.take_async(loop, store._settings)
        self.queue: list[tuple[_Item, asyncio.Future[Reservation | StateBreach]]] = []
        self.inflight = 0
        self.scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    # --- batching -----------------------------------------------------------------------------

    def reserve(self, item: _Item) -> asyncio.Future[Reservation | StateBreach]:
        future: asyncio.Future[Reservation | StateBreach] = self.loop.create_future()
        self.queue.append((item, future))
        if not self.scheduled and self.inflight < _LANES:
            self.scheduled = True
            self.loop.call_soon(self._launch)  # once the callers woken with us have queued
        return future

    def _launch(self) -> None:
        self.scheduled = False
        while self.queue and self.inflight < _LANES:
            batch, self.queue = self.queue[:_MAX_BATCH], self.queue[_MAX_BATCH:]
            self.inflight += 1
            task = self.loop.create_task(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(
        self, batch: list[tuple[_Item, asyncio.Future[Reservation | StateBreach]]]
    ) -> None:
        try:
            await self._judge(batch)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self.inflight -= 1
            if self.queue and not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._launch)

    async def _judge(
        self, batch: list[tuple[_Item, asyncio.Future[Reservation | StateBreach]]]
    ) -> None:
        """One statement for the batch; if the server refused it, one per reservation."""
        items = [item for item, _ in batch]
        try:
            outcomes = await self.call(
                "reserve",
                lambda conn, retry: self.store._areserve(conn, items, retry),
                retry=True,
            )
        except StateStoreError as exc:
            cause = exc.__cause__
            state = cause.sqlstate if isinstance(cause, psycopg.Error) else None
            if len(batch) == 1 or state is None or state[:2] in ("08", "57"):
                raise
            # One reservation may have failed the statement (a total past 96 digits): judge
            # each on its own, so that only its caller gets the error.
            for one in batch:
                try:
                    await self._judge([one])
                except Exception as error:
                    if not one[1].done():
                        one[1].set_exception(error)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    # --- statements ---------------------------------------------------------------------------

    async def send(self, query: str, params: Callable[[str], tuple[object, ...]], what: str) -> Any:
        """:meth:`PostgresStateStore._send` for asyncio (one row)."""
        commits_of = self.store._commits

        async def run(conn: _AsyncConnection, retrying: bool) -> Any:
            commits = commits_of.take()
            try:
                cursor = await conn.execute(query, params(_texts(commits)))
                return await cursor.fetchone()
            except BaseException:
                commits_of.put_back(commits)
                raise

        return await self.call(what, run, retry=True)

    async def call(
        self,
        what: str,
        run: Callable[[_AsyncConnection, bool], Awaitable[_T]],
        *,
        retry: bool,
    ) -> _T:
        """:meth:`PostgresStateStore._call` for asyncio."""
        store = self.store
        if not store._schema_checked:
            await asyncio.to_thread(store.migrate)  # once per store, as on the sync path
            store._schema_checked = True
        attempts = 0
        while True:
            attempts += 1
            try:
                conn = await self.pool.lease()
            except PoolClosed:
                raise StateStoreError(f"PostgreSQL at {store.where}: the store is closed") from None
            action = "raise"
            try:
                return await run(conn, attempts > 1)
            except psycopg.Error as exc:
                action = store._triage(exc, conn, retry, attempts, True)
                if action == "raise":
                    raise store._error(what, exc) from exc
            except (StateStoreError, LimenexConfigError):
                raise
            except Exception as exc:
                raise store._error(what, exc) from exc
            finally:
                with contextlib.suppress(Exception):
                    await self.pool.putconn(conn)
            if action == "check":
                with contextlib.suppress(Exception):
                    await self.pool.check()
            elif action == "migrate":
                await asyncio.to_thread(store.migrate)

    # --- closing ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Wait for the statements in flight, then let go of the pool (closing it if last)."""
        if self.closed:
            return
        self.closed = True
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
        if _Pools.give_back_async(self.loop, self.pool):
            with contextlib.suppress(Exception):
                await self.pool.close(timeout=self.store._settings.timeout)

    def close_from_outside(self) -> None:
        """Close from a sync caller: through the loop if it runs, else by force."""
        loop = self.loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:  # cannot wait for it here: it runs after the caller
            task = loop.create_task(self.aclose())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        elif loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.aclose(), loop)
            with contextlib.suppress(Exception):
                future.result(self.store._settings.timeout)
        elif not self.closed:  # the loop has stopped: no task of it can run any more
            self.closed = True
            if _Pools.give_back_async(loop, self.pool):
                self.pool.abandon()
