"""Totals in Redis: :class:`RedisStateStore`, shared by every process that points at one server.

Every operation is one Lua script, run with ``EVALSHA`` (the script is sent again with
``EVAL`` when the server answers ``NOSCRIPT``, e.g. after ``SCRIPT FLUSH`` or a restart). A
script runs atomically on the server, so the whole reserve — read the totals, judge each
check in order, add the amounts, record the pending reservation — is one atomic step
whatever the number of processes and connections. All logic lives in the script; Python only
prepares arguments and decodes replies.

One round trip per governed call: ``reserve`` is one script call, and ``commit`` queues the
reservation id in a :class:`~limenex.core.state.CommitQueue`; the queued ids ride at the head
of the next script call (of any operation), which drops their pending records before doing
its own work. On the async path, operations issued while a round trip is in flight wait for
the next one and are sent together in ONE script call (a batch), each judged in order and
atomically, exactly as if sent one by one.

Time is always the ``now`` the engine passes (its injected clock), never the server's.

Keys
----

Every key of a store starts with ``{prefix}:``, so all of them share one hash slot and the
store works on Redis Cluster (the script is routed by ``{prefix}:h``, the only declared key,
and builds the others' names itself). A table — one ``(dimension, scope, window)`` — is
named by ``tid``, its three strings each prefixed by its length (``9:spend_usd5:agent0:``),
so any characters are safe::

    {p}:p:<tid>            hash   subject -> total                     (no window)
    {p}:c:<tid>            hash   subject -> "<period> <total>"        (calendar window)
    {p}:s:<tid>            hash   subject -> running sum of its entries (rolling window)
    {p}:r:<tid>:<subject>  list   "<time> <amount>" entries, oldest first (rolling window)
    {p}:t                  set    every table: "p|<tid>", "c|<tid>", "r<seconds>|<tid>"
    {p}:h                  hash   reservation id -> pending record (JSON array)
    {p}:x                  zset   reservation id, scored by expiry

A pending record is ``[created, expires, owner, kind, tid, subject, where, amount, ...]``
(five fields per amount; ``where`` is ``""``, the calendar period or the rolling entry's
time), which is what a release needs to undo exactly its own amounts.

A rolling subject's list is in the order amounts were recorded, as the in-memory store keeps
it (an entry recorded by a clock that went back waits behind the later ones); it prunes its
expired entries from the head on every access, so each entry is removed once: amortised
constant work, with the running sum updated exactly. A reserve drops at most a few expired
pending records, oldest first, through the expiry index: bounded work whatever the number
of records. ``totals``, ``pending``, ``reset`` and a refund through ``adjust`` go through
all the keys or records concerned: operator paths.

Within one script call a plain or calendar total is read once and written once, at the end,
before the new pending records (so a call cut short can leave an amount counted without its
record — as an expired reservation is — never a record whose amount is not counted): a batch
of reserves on one hot counter costs one read and one write of it. Reservation ids are a
random 64-bit prefix per process and a counter; a reservation carries the store's server,
database and prefix, and another store ignores it.

Exact decimals in Lua
---------------------

Lua numbers are doubles. Amounts and totals therefore travel and are stored as decimal
strings, and the script adds, subtracts (never below zero) and compares them exactly, as
fixed-point integers in base-10^9 limbs, keeping the places each value shows as Decimal
does: up to 18 decimal places and 96 significant digits (those of ``EXACT``). An amount
with more places, or a total that would need more digits, is refused with a
:class:`~limenex.core.errors.StateStoreError` saying it cannot be kept exactly, and
nothing changes. A limit is reduced in Python to an equivalent one the script can compare
(a negative, huge or over-precise limit decides every comparison the same way as the
original). Calendar periods are named in Python (``Window.bucket(now)``) and passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import select
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import ROUND_FLOOR, Context, Decimal
from typing import Any, Final

from limenex.core.errors import LimenexConfigError, StateStoreError
from limenex.core.state import (
    Check,
    CommitQueue,
    CounterKey,
    PendingReservation,
    Reservation,
    StateBreach,
    StateStore,
    counter_window,
)
from limenex.core.stores import _period
from limenex.core.window import Window

try:
    import redis
    import redis.asyncio
    import redis.asyncio.connection
    import redis.connection
    import redis.exceptions
except ImportError as exc:  # pragma: no cover - the extra is installed in development
    raise LimenexConfigError(
        f"RedisStateStore needs the redis client library ({exc.name or exc}): "
        "pip install 'limenex[redis]'"
    ) from exc

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - the extra installs hiredis
    _hiredis_pack = None

__all__ = ["LUA_DECIMAL", "RedisStateStore"]

SCALE: Final = 18
"""Decimal places kept exactly."""
MAX_DIGITS: Final = 96
"""Significant digits kept exactly (before the point and places shown): those of
:data:`~limenex.core.state.EXACT`."""

LUA_DECIMAL: Final = r"""
-- Exact non-negative decimals, as Python's Decimal keeps them: fixed point with 18 places,
-- little-endian limbs of base 10^9 (limbs 1-2: the fraction), and `p`, the places shown
-- (a sum shows the wider operand's, as Decimal does: 30.0 + 30 is 60.0). Limb sums stay
-- below 2^31: exact in doubles.
local BASE = 1000000000
local MAXINT = 96
local Z = {0, 0, p = 0}

local function dtrim(n)
  local k = #n
  while k > 2 and n[k] == 0 do n[k] = nil; k = k - 1 end
  return n
end

-- "123", "0.5", "007.250": nil if not a plain decimal, or beyond 18 places or 96 digits.
local function dparse(s)
  local i, f = string.match(s, '^(%d+)%.?(%d*)$')
  if not i or #f > 18 then return nil end
  i = string.match(i, '^0*(.-)$')
  if #i > MAXINT then return nil end
  local places = #f
  f = f .. string.rep('0', 18 - places)
  local n = {tonumber(string.sub(f, 10, 18)), tonumber(string.sub(f, 1, 9)), p = places}
  local k = #i
  while k > 0 do
    local a = k - 8
    if a < 1 then a = 1 end
    n[#n + 1] = tonumber(string.sub(i, a, k))
    k = a - 1
  end
  return n
end

local function dfmt(n)
  local k = #n
  local s = '0'
  if k > 2 then
    local parts = {string.format('%d', n[k])}
    for j = k - 1, 3, -1 do parts[#parts + 1] = string.format('%09d', n[j]) end
    s = table.concat(parts)
  end
  if n.p == 0 then return s end
  return s .. '.' .. string.sub(string.format('%09d%09d', n[2], n[1]), 1, n.p)
end

local function dcmp(a, b)
  if #a ~= #b then
    if #a < #b then return -1 end
    return 1
  end
  for k = #a, 1, -1 do
    if a[k] ~= b[k] then
      if a[k] < b[k] then return -1 end
      return 1
    end
  end
  return 0
end

local function dadd(a, b)
  local r, carry = {}, 0
  local n = #a
  if #b > n then n = #b end
  for k = 1, n do
    local s = (a[k] or 0) + (b[k] or 0) + carry
    if s >= BASE then r[k] = s - BASE; carry = 1 else r[k] = s; carry = 0 end
  end
  if carry > 0 then r[n + 1] = carry end
  r.p = math.max(a.p, b.p)
  return r
end

-- a - b, for a >= b (a total less one of its own amounts); plain zero if a < b.
local function dsub(a, b)
  if dcmp(a, b) < 0 then return Z end
  local r, borrow = {}, 0
  for k = 1, #a do
    local s = a[k] - (b[k] or 0) - borrow
    if s < 0 then r[k] = s + BASE; borrow = 1 else r[k] = s; borrow = 0 end
  end
  dtrim(r)
  r.p = math.max(a.p, b.p)
  return r
end

-- a - b if that is positive, else plain zero: a refund or release never goes below zero.
local function dsub0(a, b)
  if dcmp(a, b) <= 0 then return Z end
  return dsub(a, b)
end

-- Whether Decimal would need more than 96 significant digits for n: the digits before the
-- point and the places shown (what limenex.core.state.EXACT computes with).
local function dwide(n)
  if #n <= 2 then return false end
  return 9 * (#n - 3) + #string.format('%d', n[#n]) + n.p > MAXINT
end
"""
"""The exact decimal arithmetic of the store's script, alone (tests run it on its own)."""

_LUA_STORE: Final = r"""
-- ARGV: prefix, ncommits, id*, nops, then each operation: code, now, its own arguments.
-- Reads of plain and calendar totals go through `cells`, and their writes are made once,
-- at the end, followed by the new pending records: a batch of reserves on one hot counter
-- reads and writes it once. Rolling entries are written as they go.
local P = ARGV[1]
local H, X, T = P .. 'h', P .. 'x', P .. 't'
local call = redis.call
local parsed, periods, cells, dirty, tables, records, expiries = {}, {}, {}, {}, {}, {}, {}

local function num(s)
  local n = parsed[s]
  if n then return n end
  n = dparse(s)
  if not n then error('limenex: not a decimal the store keeps: ' .. tostring(s)) end
  parsed[s] = n
  return n
end

-- Canonical text of a value, remembered on it (values are never changed in place).
local function text(n)
  local t = n.t
  if not t then
    t = dfmt(n)
    n.t = t
  end
  return t
end

-- Calendar period names compare as the number their digits make (fixed-width fields).
local function pnum(s)
  local v = periods[s]
  if not v then
    v = tonumber((string.gsub(s, '%D', '')))
    periods[s] = v
  end
  return v
end

local function split(e)
  local sp = string.find(e, ' ', 1, true)
  return string.sub(e, 1, sp - 1), string.sub(e, sp + 1)
end

local function chunks(list, fn)
  local n, a = #list, 1
  while a <= n do
    local b = a + 499
    if b > n then b = n end
    fn(unpack(list, a, b))
    a = b + 1
  end
end

local function drop(ids)
  chunks(ids, function(...) call('HDEL', H, ...); call('ZREM', X, ...) end)
end

-- Drop pending records expired at `now` (a string): at most `limit`, or all.
local function expire(now, limit)
  if limit then
    drop(call('ZRANGEBYSCORE', X, '-inf', now, 'LIMIT', 0, limit))
    return
  end
  while true do
    local ids = call('ZRANGEBYSCORE', X, '-inf', now, 'LIMIT', 0, 1000)
    drop(ids)
    if #ids < 1000 then return end
  end
end

-- A plain ('p') or calendar ('c') counter as stored: {total, period, stored, key, subject,
-- kind, tid, dirty}; `stored`: Redis holds a value for it.
local function cell(kind, tid, subject)
  local ck = kind .. tid .. subject
  local c = cells[ck]
  if c then return c end
  local K = P .. kind .. ':' .. tid
  local v = call('HGET', K, subject)
  c = {Z, nil, v ~= false, K, subject, kind, tid, false}
  if v and kind == 'p' then
    c[1] = num(v)
  elseif v then
    local period, total = split(v)
    c[1], c[2] = num(total), period
  end
  cells[ck] = c
  return c
end

local function set(c, total, period)
  c[1], c[2] = total, period
  if not c[8] then
    c[8] = true
    dirty[#dirty + 1] = c
  end
end

-- A rolling subject's total at `now` after pruning its expired entries; nil: no entries.
local function rolling(tid, subject, seconds, now)
  local S = P .. 's:' .. tid
  local sum = call('HGET', S, subject)
  if not sum then return nil end
  local L = P .. 'r:' .. tid .. ':' .. subject
  local head = call('LINDEX', L, 0)
  if not head then
    call('HDEL', S, subject)
    return nil
  end
  if tonumber((split(head))) + seconds > now then return num(sum) end
  local total, dropped, all = num(sum), 0, false
  while true do
    local chunk = call('LRANGE', L, dropped, dropped + 99)
    local n = 0
    for _, e in ipairs(chunk) do
      local t, a = split(e)
      if tonumber(t) + seconds > now then break end
      total = dsub(total, num(a))
      n = n + 1
    end
    dropped = dropped + n
    if n < #chunk then break end
    if #chunk < 100 then all = true; break end
  end
  if all then
    call('DEL', L)
    call('HDEL', S, subject)
    return nil
  end
  call('LTRIM', L, dropped, -1)
  call('HSET', S, subject, text(total))
  return total
end

-- A counter's total at `now`, and for a calendar one the period it belongs to.
local function current(kind, tid, subject, extra, now)
  if kind == 'p' then return cell(kind, tid, subject)[1] end
  if kind == 'c' then
    local c = cell(kind, tid, subject)
    if c[2] and pnum(c[2]) >= pnum(extra) then return c[1], c[2] end
    return Z, extra
  end
  return rolling(tid, subject, tonumber(extra), now) or Z
end

-- Record `amount` on a counter whose new total is `total`; where it went.
local function put(kind, tid, subject, extra, nowstr, amount, total, period)
  if kind == 'p' then
    set(cell(kind, tid, subject), total, nil)
    return ''
  elseif kind == 'c' then
    set(cell(kind, tid, subject), total, period)
    return period
  end
  call('RPUSH', P .. 'r:' .. tid .. ':' .. subject, nowstr .. ' ' .. text(amount))
  call('HSET', P .. 's:' .. tid, subject, text(total))
  tables['r' .. extra .. '|' .. tid] = true
  return nowstr
end

-- Undo one amount of a released reservation, if it still counts where it was put.
local function take(kind, tid, subject, where, amount)
  if kind == 'p' then
    local c = cell(kind, tid, subject)
    if c[3] or c[8] then set(c, dsub0(c[1], num(amount)), nil) end
  elseif kind == 'c' then
    local c = cell(kind, tid, subject)
    if c[2] == where then set(c, dsub0(c[1], num(amount)), where) end
  else
    local L = P .. 'r:' .. tid .. ':' .. subject
    if call('LREM', L, -1, where .. ' ' .. amount) > 0 then
      local S = P .. 's:' .. tid
      if call('EXISTS', L) == 0 then
        call('HDEL', S, subject)
      else
        local sum = call('HGET', S, subject)
        if sum then call('HSET', S, subject, text(dsub(num(sum), num(amount)))) end
      end
    end
  end
end

local function holds(op, p, limit)
  if op == 'T' then return true elseif op == 'F' then return false end
  local c = dcmp(p, num(limit))
  if op == 'lte' then return c <= 0
  elseif op == 'lt' then return c < 0
  elseif op == 'gte' then return c >= 0
  elseif op == 'gt' then return c > 0
  elseif op == 'eq' then return c == 0 end
  return c ~= 0
end

local function too_big(total, amount)
  return {'E', 'cannot keep an exact total: ' .. text(total) .. ' + ' .. amount ..
    ' needs more than ' .. MAXINT .. ' significant digits'}
end

-- R now write id expires owner nkeys (kind tid subject extra amount)* nchecks (key op limit)*
local function reserve(i, nowstr)
  local now = tonumber(nowstr)
  local write, id, expires, owner = ARGV[i] == '1', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local nkeys = tonumber(ARGV[i + 4])
  local kb = i + 5
  local cb = kb + 5 * nkeys
  local nchecks = tonumber(ARGV[cb])
  local after = cb + 1 + 3 * nchecks
  local totals, projected, where, out = {}, {}, {}, {'R'}
  for c = 0, nchecks - 1 do
    local at = cb + 1 + 3 * c
    local k = tonumber(ARGV[at])
    if not projected[k] then
      local o = kb + 5 * k
      local total, period = current(ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], now)
      local p = dadd(total, num(ARGV[o + 4]))
      if dwide(p) then return too_big(total, ARGV[o + 4]), after end
      totals[k], projected[k], where[k] = total, p, period
    end
    if not holds(ARGV[at + 1], projected[k], ARGV[at + 2]) then
      return {'B', tostring(c), text(totals[k]), text(projected[k])}, after
    end
    out[c + 2] = text(totals[k])
  end
  if not write then return {'X'}, after end
  local record = {nowstr, expires, owner}
  for k = 0, nkeys - 1 do
    local o = kb + 5 * k
    local kind, tid, subject = ARGV[o], ARGV[o + 1], ARGV[o + 2]
    local amount = num(ARGV[o + 4])
    local r = #record
    record[r + 1], record[r + 2], record[r + 3], record[r + 5] = kind, tid, subject, text(amount)
    record[r + 4] = put(kind, tid, subject, ARGV[o + 3], nowstr, amount, projected[k], where[k])
  end
  records[#records + 1] = id
  records[#records + 1] = cjson.encode(record)
  expiries[#expiries + 1] = expires
  expiries[#expiries + 1] = id
  return out, after
end

-- P now n (kind tid subject extra)*
local function peek(i, now)
  local n = tonumber(ARGV[i])
  local out = {}
  for c = 0, n - 1 do
    local o = i + 1 + 4 * c
    out[c + 1] = text((current(ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], now)))
  end
  return out, i + 1 + 4 * n
end

-- L now id (a release never concerns a record made in the same call: it answers a reserve)
local function release(i, now)
  local id = ARGV[i]
  local rec = call('HGET', H, id)
  if not rec then return 'N', i + 1 end
  call('HDEL', H, id)
  call('ZREM', X, id)
  local r = cjson.decode(rec)
  if tonumber(r[2]) <= now then return 'E', i + 1 end
  for k = 4, #r, 5 do take(r[k], r[k + 1], r[k + 2], r[k + 3], r[k + 4]) end
  return 'U', i + 1
end

-- The live pending amounts on one counter, as {where, amount} (expired records dropped).
local function held(kind, tid, subject, nowstr)
  expire(nowstr, nil)
  local out = {}
  for _, rec in ipairs(call('HVALS', H)) do
    local r = cjson.decode(rec)
    for k = 4, #r, 5 do
      if r[k] == kind and r[k + 1] == tid and r[k + 2] == subject then
        out[#out + 1] = {r[k + 3], r[k + 4]}
      end
    end
  end
  return out
end

-- total + delta; a refund stops at the held amounts (never above the total), as Decimal
-- would compute it: min(total, held) is the total unless the held sum is below it.
local function adjusted(total, delta, refund, amounts)
  if not refund then return dadd(total, delta) end
  local sum = Z
  for _, h in ipairs(amounts) do sum = dadd(sum, num(h[2])) end
  local floor = total
  if dcmp(sum, total) < 0 then floor = sum end
  if dcmp(total, delta) > 0 then
    local new = dsub(total, delta)
    if dcmp(new, floor) > 0 then return new end
  end
  return floor
end

-- A now kind tid subject extra sign magnitude (alone in its call)
local function adjust(i, nowstr)
  local now = tonumber(nowstr)
  local kind, tid, subject, extra = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local delta = num(ARGV[i + 5])
  local after = i + 6
  local refund = ARGV[i + 4] == '-' and dcmp(delta, Z) > 0
  local amounts = {}
  if refund then amounts = held(kind, tid, subject, nowstr) end
  if kind == 'p' or kind == 'c' then
    local c = cell(kind, tid, subject)
    local period, total = nil, c[1]
    if kind == 'c' then
      period, total = extra, Z
      if c[2] and pnum(c[2]) >= pnum(extra) then period, total = c[2], c[1] end
      local mine = {}
      for _, h in ipairs(amounts) do
        if h[1] == period then mine[#mine + 1] = h end
      end
      amounts = mine
    end
    local new = adjusted(total, delta, refund, amounts)
    if dwide(new) then return too_big(total, ARGV[i + 5]), after end
    set(c, new, period)
    return {'V', text(new)}, after
  end
  local total = rolling(tid, subject, tonumber(extra), now)
  local L, S = P .. 'r:' .. tid .. ':' .. subject, P .. 's:' .. tid
  if not refund then
    local new = dadd(total or Z, delta)
    if dwide(new) then return too_big(total or Z, ARGV[i + 5]), after end
    if dcmp(delta, Z) > 0 then
      call('RPUSH', L, nowstr .. ' ' .. text(delta))
      call('HSET', S, subject, text(new))
      tables['r' .. extra .. '|' .. tid] = true
    end
    return {'V', text(new)}, after
  end
  if not total then return {'V', '0'}, after end
  -- Consume the oldest entries first, skipping those a pending release will look for.
  local pending = {}
  for _, h in ipairs(amounts) do
    local e = h[1] .. ' ' .. h[2]
    pending[e] = (pending[e] or 0) + 1
  end
  local kept, owed = {}, delta
  for _, e in ipairs(call('LRANGE', L, 0, -1)) do
    if (pending[e] or 0) > 0 then
      pending[e] = pending[e] - 1
      kept[#kept + 1] = e
    elseif dcmp(owed, Z) == 0 then
      kept[#kept + 1] = e
    else
      local t, a = split(e)
      local amount = num(a)
      if dcmp(amount, owed) > 0 then
        kept[#kept + 1] = t .. ' ' .. text(dsub(amount, owed))
        owed = Z
      else
        owed = dsub(owed, amount)
      end
    end
  end
  local new = dsub(total, dsub(delta, owed))
  call('DEL', L)
  if #kept == 0 then
    call('HDEL', S, subject)
  else
    chunks(kept, function(...) call('RPUSH', L, ...) end)
    call('HSET', S, subject, text(new))
  end
  return {'V', text(new)}, after
end

-- T now (alone in its call): {member, {subject, value, ...}} per table.
local function totals(i, now)
  local out = {}
  for _, m in ipairs(call('SMEMBERS', T)) do
    local kind, extra, tid = string.match(m, '^(%a)(%d*)|(.*)$')
    local values = {}
    if kind == 'r' then
      for _, s in ipairs(call('HKEYS', P .. 's:' .. tid)) do
        local total = rolling(tid, s, tonumber(extra), now)
        if total then
          values[#values + 1] = s
          values[#values + 1] = text(total)
        end
      end
    else
      values = call('HGETALL', P .. kind .. ':' .. tid)
    end
    out[#out + 1] = {m, values}
  end
  return out, i
end

-- Q now (alone in its call): id, record, ... of every live pending reservation, by expiry.
local function pending(i, nowstr)
  expire(nowstr, nil)
  local out = {}
  local ids = call('ZRANGE', X, 0, -1)
  local n, a = #ids, 1
  while a <= n do
    local b = a + 499
    if b > n then b = n end
    local recs = call('HMGET', H, unpack(ids, a, b))
    for j = a, b do
      local rec = recs[j - a + 1]
      if rec then
        out[#out + 1] = ids[j]
        out[#out + 1] = rec
      end
    end
    a = b + 1
  end
  return out, i
end

local function drop_table(m)
  local kind, _, tid = string.match(m, '^(%a)(%d*)|(.*)$')
  if kind ~= 'r' then
    call('UNLINK', P .. kind .. ':' .. tid)
    return
  end
  local S = P .. 's:' .. tid
  local lists = {}
  for _, s in ipairs(call('HKEYS', S)) do lists[#lists + 1] = P .. 'r:' .. tid .. ':' .. s end
  chunks(lists, function(...) call('UNLINK', ...) end)
  call('UNLINK', S)
end

-- Z now all dimension-prefix (alone in its call)
local function reset(i)
  local all, dim = ARGV[i] == '1', ARGV[i + 1]
  for _, m in ipairs(call('SMEMBERS', T)) do
    local tid = string.match(m, '|(.*)$')
    if all or string.sub(tid, 1, #dim) == dim then
      drop_table(m)
      if not all then call('SREM', T, m) end
    end
  end
  if all then
    call('UNLINK', H, X, T)
    return 'OK', i + 2
  end
  local flat = call('HGETALL', H)
  for j = 1, #flat, 2 do
    local id, r = flat[j], cjson.decode(flat[j + 1])
    local kept = {r[1], r[2], r[3]}
    for k = 4, #r, 5 do
      if string.sub(r[k + 1], 1, #dim) ~= dim then
        for q = 0, 4 do kept[#kept + 1] = r[k + q] end
      end
    end
    if #kept == 3 then
      call('HDEL', H, id)
      call('ZREM', X, id)
    elseif #kept < #r then
      call('HSET', H, id, cjson.encode(kept))
    end
  end
  return 'OK', i + 2
end

local i = 2
local ncommits = tonumber(ARGV[i])
if ncommits > 0 then
  local ids = {}
  for k = 1, ncommits do ids[k] = ARGV[i + k] end
  drop(ids)
end
i = i + ncommits + 1
local nops = tonumber(ARGV[i])
i = i + 1
local out, expired = {}, false
for o = 1, nops do
  local code, nowstr = ARGV[i], ARGV[i + 1]
  local now = tonumber(nowstr)
  i = i + 2
  local r
  if code == 'R' then
    if not expired then
      expire(nowstr, 8 + 2 * nops)
      expired = true
    end
    r, i = reserve(i, nowstr)
  elseif code == 'P' then r, i = peek(i, now)
  elseif code == 'L' then r, i = release(i, now)
  elseif code == 'A' then r, i = adjust(i, nowstr)
  elseif code == 'T' then r, i = totals(i, now)
  elseif code == 'Q' then r, i = pending(i, nowstr)
  elseif code == 'Z' then r, i = reset(i)
  elseif code == 'C' then r = 'OK'
  else return redis.error_reply('limenex: unknown operation ' .. tostring(code)) end
  out[o] = r
end
-- The totals first, then the records of the amounts they hold: a call cut short leaves
-- amounts counted without a record (as an expired reservation), never the reverse.
for _, c in ipairs(dirty) do
  if c[6] == 'p' then
    call('HSET', c[4], c[5], text(c[1]))
  else
    call('HSET', c[4], c[5], c[2] .. ' ' .. text(c[1]))
  end
  if not c[3] then tables[c[6] .. '|' .. c[7]] = true end
end
local members = {}
for m in pairs(tables) do members[#members + 1] = m end
chunks(members, function(...) call('SADD', T, ...) end)
chunks(records, function(...) call('HSET', H, ...) end)
chunks(expiries, function(...) call('ZADD', X, ...) end)
return out
"""

SCRIPT: Final = LUA_DECIMAL + _LUA_STORE
"""The store's one script."""
SCRIPT_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

_PLAIN = re.compile(r"[0-9]{1,95}(?:\.[0-9]{0,18})?")
_BIG = Decimal(10) ** MAX_DIGITS
_QUANTUM = Decimal(1).scaleb(-SCALE)
_WIDE = Context(prec=MAX_DIGITS + SCALE + 8)
_BATCH = 256
"""Most operations in one async script call: a long batch would hold the server up."""
_IN_FLIGHT = 2
"""Script calls one event loop keeps in flight at once; the rest wait to be batched."""

Op = list[str]
"""One operation's script arguments: code, now, then its own."""


def _fixed(value: Decimal, *, limit: bool = False) -> str:
    """``value`` (finite, not negative) as plain decimal text the script keeps exactly.

    Trailing zeros stay (``30.0``), as a Decimal total keeps them; past 18 places they are
    dropped, which changes no value. A ``limit`` is only compared, so it may have up to 96
    digits before the point whatever its places.
    """
    text = str(value)
    if _PLAIN.fullmatch(text) and len(text) <= MAX_DIGITS:
        return text
    _, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # pragma: no cover - the callers pass finite values
        raise StateStoreError(f"amount {value} is not a finite number")
    kept = list(digits)
    while exponent < -SCALE and len(kept) > 1 and kept[-1] == 0:
        kept.pop()
        exponent += 1
    if not any(kept):
        return format(Decimal((0, (0,), min(max(exponent, -SCALE), 0))), "f")
    if exponent < -SCALE:
        raise StateStoreError(
            f"cannot keep {value} exactly: the Redis store keeps {SCALE} decimal places"
        )
    before = len(kept) + exponent  # digits before the point (if positive)
    wide = before if limit else before + max(-exponent, 0)
    if before > 0 and wide > MAX_DIGITS:
        raise StateStoreError(
            f"cannot keep {value} exactly: the Redis store keeps {MAX_DIGITS} significant digits"
        )
    return format(Decimal((0, tuple(kept), exponent)), "f")


def _bound(op: str, limit: Decimal) -> tuple[str, str]:
    """``(op, limit)`` the script can judge exactly, deciding as ``(op, limit)`` does.

    Every total is a non-negative multiple of 10^-18 below 10^96: a limit outside that
    range, or between two such values, is replaced by one that decides each comparison the
    same way (``"T"``/``"F"``: always true/false).
    """
    if op not in ("lt", "lte", "gt", "gte", "eq", "neq"):
        raise StateStoreError(f"unknown operator {op!r}")
    if limit.is_nan():
        raise StateStoreError(f"cannot compare a total with the limit {limit}")
    below = ("lt", "lte", "neq")  # true for every total when the limit is above them all
    if limit.is_infinite() or limit >= _BIG:
        if limit > 0:
            return ("T" if op in below else "F"), ""
        return ("F" if op in ("lt", "lte", "eq") else "T"), ""
    if limit < 0:
        return ("F" if op in ("lt", "lte", "eq") else "T"), ""
    floor = limit.quantize(_QUANTUM, rounding=ROUND_FLOOR, context=_WIDE)
    if floor == limit:
        return op, _fixed(floor, limit=True)
    # Strictly between two totals: never equal, and < / <= / > / >= turn on the floor.
    if op in ("eq", "neq"):
        return ("F" if op == "eq" else "T"), ""
    return ("lte" if op in ("lt", "lte") else "gt"), _fixed(floor, limit=True)


def _table_id(dimension: str, scope: str, window: str) -> str:
    return f"{len(dimension)}:{dimension}{len(scope)}:{scope}{len(window)}:{window}"


def _parse_table_id(tid: str) -> tuple[str, str, str]:
    fields: list[str] = []
    at = 0
    for _ in range(3):
        colon = tid.index(":", at)
        length = int(tid[at:colon])
        fields.append(tid[colon + 1 : colon + 1 + length])
        at = colon + 1 + length
    return fields[0], fields[1], fields[2]


def _check_lease(seconds: float, name: str = "lease_seconds") -> float:
    if type(seconds) not in (int, float) or not (math.isfinite(seconds) and seconds > 0):
        raise LimenexConfigError(f"{name} must be a positive number, got {seconds!r}")
    return float(seconds)


def _stale(fd: int) -> bool:
    """Whether an idle connection's socket has something to read: EOF, an error, garbage."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


class _Deferred:
    """An invalid check after the first: judged only if the checks before it all hold."""

    __slots__ = ("error",)

    def __init__(self, error: StateStoreError) -> None:
        self.error = error


class _Side:
    """One event loop's connections and the operations waiting for its next script call."""

    __slots__ = (
        "closed",
        "conns",
        "idle",
        "in_flight",
        "loop",
        "queue",
        "scheduled",
        "tasks",
        "watch",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self.conns: set[redis.asyncio.connection.AbstractConnection] = set()
        self.idle: list[redis.asyncio.connection.AbstractConnection] = []
        self.queue: list[tuple[Op, asyncio.Future[Any]]] = []
        self.in_flight = 0
        self.scheduled = False
        self.closed = False
        self.watch: AsyncIterator[None] | None = None


class RedisStateStore(StateStore):
    """Totals in one Redis database, under one key prefix; see the module docstring.

    ``url`` is a ``redis://`` or ``rediss://`` URL as redis-py reads it (a password in it is
    never shown in a message or ``repr``). ``prefix`` separates stores that share a server.
    ``connect_timeout`` bounds opening a connection and ``timeout`` each operation, so an
    unreachable or hung server fails a call (a BLOCK) within seconds. A dropped connection
    is opened again on the next call. Thread-safe; the async methods use redis-py's asyncio
    connections, one set per event loop.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "limenex",
        lease_seconds: float = 300.0,
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise LimenexConfigError(
                f"prefix must be a non-empty string without braces, got {prefix!r}"
            )
        self.lease_seconds = _check_lease(lease_seconds)
        self.connect_timeout = _check_lease(connect_timeout, "connect_timeout")
        self.timeout = _check_lease(timeout, "timeout")
        self.prefix = prefix
        self.url = url  # for stores kept beside this one (approvals): same server, same prefix
        try:
            options: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
            async_options: dict[str, Any] = dict(redis.asyncio.connection.parse_url(url))
        except (ValueError, TypeError, AttributeError) as exc:
            raise LimenexConfigError(f"not a Redis URL: {exc}") from None
        self._password = str(options.get("password") or "")
        if "path" in options:
            self.server = str(options["path"])
        else:
            host = str(options.get("host", "localhost"))
            self.server = (
                f"[{host}]:{options.get('port', 6379)}"
                if ":" in host
                else (f"{host}:{options.get('port', 6379)}")
            )
        self._db = int(options.get("db", 0) or 0)
        timeouts = {
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.timeout,
            "decode_responses": True,
        }
        self._sync_class = options.pop("connection_class", redis.connection.Connection)
        self._sync_options = {**options, **timeouts}
        self._async_class = async_options.pop(
            "connection_class", redis.asyncio.connection.Connection
        )
        # Async reads and writes are bounded by one deadline around the whole round trip
        # (cheaper than redis-py's per-read timeout and per-write task).
        self._async_options = {**async_options, **timeouts, "socket_timeout": None}
        try:  # made, not connected: an option redis-py does not take fails here, not per call
            self._sync_class(**self._sync_options)
            self._async_class(**self._async_options)
        except (TypeError, ValueError) as exc:
            reason = str(exc).replace(self._password, "***") if self._password else str(exc)
            raise LimenexConfigError(f"Redis URL option refused by the client: {reason}") from None
        self._key = "{" + prefix + "}:"
        self._route = self._key + "h"
        # Reservations of another store (server, database or prefix) are not ours to settle.
        self._token = f"{self.server}/{self._db}/{prefix}"
        self._commits = CommitQueue()
        self._idle: list[redis.connection.AbstractConnection] = []
        self._sides: dict[asyncio.AbstractEventLoop, _Side] = {}
        self._lock = threading.Lock()
        self._pid = 0
        self._owner = ""
        self._id_base = ""
        self._ids: itertools.count[int] = itertools.count()
        self._tables: dict[tuple[str, str, str, Window | None], tuple[str, str, str]] = {}
        self._limits: dict[tuple[str, Decimal], tuple[str, str]] = {}
        self._buckets: dict[str, tuple[float, float, str]] = {}
        self._forked()

    def __repr__(self) -> str:
        return f"RedisStateStore(server={self.server!r}, db={self._db}, prefix={self.prefix!r})"

    # --- the contract ------------------------------------------------------------------------

    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        op, deferred, rid = self._reserve_op(checks, now)
        return self._reserved(self._run([op])[0], deferred, rid)

    def commit(self, reservation: Reservation) -> None:
        if reservation.token == self._token and self._commits.add(reservation.id):
            self._run([["C", "0"]])

    def release(self, reservation: Reservation, now: float) -> None:
        if reservation.token == self._token:
            self._run([["L", repr(now), reservation.id]])

    def peek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        op, known = self._peek_op(checks, now)
        return self._peeked(self._run([op])[0], known)

    def adjust(
        self, key: CounterKey, delta: Decimal, now: float, window: Window | None = None
    ) -> Decimal:
        kind, tid, extra = self._counter(key, window, now)
        if not delta.is_finite():
            raise StateStoreError(f"amount {delta} is not a finite number")
        sign = "-" if delta < 0 else "+"
        op = ["A", repr(now), kind, tid, key.subject, extra, sign, _fixed(delta.copy_abs())]
        return Decimal(self._checked(self._run([op])[0])[1])

    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        out: list[tuple[CounterKey, Decimal]] = []
        for member, values in self._run([["T", repr(now)]])[0]:
            head, _, tid = member.partition("|")
            dimension, scope, spec = _parse_table_id(tid)
            bucket = self._bucket(Window.parse(spec), now) if head == "c" else ""
            for n in range(0, len(values), 2):
                subject, value = values[n], values[n + 1]
                if head == "c":
                    period, _, value = value.partition(" ")
                    if period < bucket:
                        continue
                out.append((CounterKey(dimension, scope, subject, spec), Decimal(value)))
        return out

    def pending(self, now: float) -> list[PendingReservation]:
        flat = self._run([["Q", repr(now)]])[0]
        out = []
        for n in range(0, len(flat), 2):
            record = json.loads(flat[n + 1])
            amounts = []
            for k in range(3, len(record), 5):
                _, tid, subject, _, amount = record[k : k + 5]
                dimension, scope, spec = _parse_table_id(tid)
                amounts.append((CounterKey(dimension, scope, subject, spec), Decimal(amount)))
            out.append(
                PendingReservation(
                    flat[n], float(record[0]), float(record[1]), tuple(amounts), record[2]
                )
            )
        return out

    def reset(self, dimension: str | None = None) -> None:
        if dimension is None:
            self._run([["Z", "0", "1", ""]])
        else:
            self._run([["Z", "0", "0", f"{len(dimension)}:{dimension}"]])

    def close(self) -> None:
        """Send the queued commits, close the connections (each event loop's it can)."""
        if len(self._commits):
            with contextlib.suppress(StateStoreError):
                self._run([["C", "0"]])
        idle, self._idle = self._idle, []
        for conn in idle:
            _disconnect(conn)
        for side in list(self._sides.values()):
            self._close_side(side)

    async def aclose(self) -> None:
        if len(self._commits):
            with contextlib.suppress(StateStoreError):
                await self._submit(["C", "0"])
        loop = asyncio.get_running_loop()
        side = self._sides.get(loop)
        if side is not None and not side.closed:
            self._forget(side)
            await self._disconnect(side)
        self.close()

    async def areserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        op, deferred, rid = self._reserve_op(checks, now)
        return self._reserved(await self._submit(op), deferred, rid)

    async def acommit(self, reservation: Reservation) -> None:
        if reservation.token == self._token and self._commits.add(reservation.id):
            await self._submit(["C", "0"])

    async def arelease(self, reservation: Reservation, now: float) -> None:
        if reservation.token == self._token:
            await self._submit(["L", repr(now), reservation.id])

    async def apeek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        op, known = self._peek_op(checks, now)
        return self._peeked(await self._submit(op), known)

    # --- arguments and replies -----------------------------------------------------------

    def _reserve_op(self, checks: Sequence[Check], now: float) -> tuple[Op, _Deferred | None, str]:
        """The reserve's script arguments; an invalid check after the first is deferred."""
        keys: dict[CounterKey, int] = {}
        key_args: list[str] = []
        check_args: list[str] = []
        deferred = None
        for position, check in enumerate(checks):
            key = check.key
            index = keys.get(key)
            try:
                if index is None:
                    amount = check.amount
                    if not amount.is_finite() or amount < 0:
                        raise StateStoreError(
                            f"amount {amount} is not a finite, non-negative number"
                        )
                    kind, tid, extra = self._counter(key, check.window, now)
                    index = keys[key] = len(keys)
                    key_args += (kind, tid, key.subject, extra, _fixed(amount))
                op, limit = self._limit(check.op, check.limit)
            except StateStoreError as exc:
                if position == 0:
                    raise
                deferred = _Deferred(exc)
                break
            check_args += (str(index), op, limit)
        pid = os.getpid()
        if pid != self._pid:
            self._forked()
        rid = f"{self._id_base}{next(self._ids)}"
        return (
            [
                "R",
                repr(now),
                "0" if deferred else "1",
                rid,
                repr(now + self.lease_seconds),
                self._owner,
                str(len(keys)),
                *key_args,
                str(len(check_args) // 3),
                *check_args,
            ],
            deferred,
            rid,
        )

    def _reserved(
        self, reply: Any, deferred: _Deferred | None, rid: str
    ) -> Reservation | StateBreach:
        code = reply[0]
        if code == "R":
            return Reservation(rid, tuple(map(Decimal, reply[1:])), self._token)
        if code == "B":
            return StateBreach(int(reply[1]), Decimal(reply[2]), Decimal(reply[3]))
        if code == "X" and deferred is not None:
            raise deferred.error
        raise StateStoreError(f"Redis at {self.server}: {reply[1] if len(reply) > 1 else reply}")

    def _peek_op(self, checks: Sequence[Check], now: float) -> tuple[Op, list[bool]]:
        args = ["P", repr(now), "0"]
        known = []
        for check in checks:
            try:
                kind, tid, extra = self._counter(check.key, check.window, now)
            except StateStoreError:  # no such counter can hold anything: reserve refuses it
                known.append(False)
                continue
            known.append(True)
            args += (kind, tid, check.key.subject, extra)
        args[2] = str(sum(known))
        return args, known

    @staticmethod
    def _peeked(reply: Any, known: list[bool]) -> tuple[Decimal, ...]:
        values = iter(reply)
        return tuple(Decimal(next(values)) if k else Decimal(0) for k in known)

    def _checked(self, reply: Any) -> Any:
        if reply[0] == "E":
            raise StateStoreError(f"Redis at {self.server}: {reply[1]}")
        return reply

    def _counter(self, key: CounterKey, window: Window | None, now: float) -> tuple[str, str, str]:
        """``(kind, table id, extra)`` of a counter; ``extra``: the period or the seconds."""
        cache = (key.dimension, key.scope, key.window, window)
        known = self._tables.get(cache)
        if known is None:
            window = counter_window(key, window)
            if window is None:
                known = ("p", "", "")
            elif window.calendar:
                known = ("c", "", window.spec)
            else:
                known = ("r", "", str(window.seconds))
            known = (known[0], _table_id(key.dimension, key.scope, key.window), known[2])
            self._sendable(known[1], "counter")
            if len(self._tables) > 4096:
                self._tables.clear()
            self._tables[cache] = known
        if not key.subject.isascii():
            self._sendable(key.subject, "subject")
        kind, tid, extra = known
        if kind == "c":
            return kind, tid, self._bucket(Window.parse(extra), now)
        return known

    def _sendable(self, text: str, what: str) -> None:
        """Refuse text UTF-8 cannot carry (a lone surrogate) before it joins a batch: sent, it
        would fail the script call of every operation batched with it."""
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise StateStoreError(
                f"cannot send the {what} {text[:40]!r} to Redis at {self.server}: {exc.reason}"
            ) from exc

    def _bucket(self, window: Window, now: float) -> str:
        """``window.bucket(now)``, remembered while ``now`` stays inside one period."""
        cached = self._buckets.get(window.spec)
        if cached is not None and cached[0] < now < cached[1]:
            return cached[2]
        name = window.bucket(now)
        start, end = _period(window.spec, now)
        # A microsecond clear of the edges, where Window.bucket's own rounding decides.
        self._buckets[window.spec] = (start + 1e-6, end - 1e-6, name)
        return name

    def _limit(self, op: str, limit: Decimal) -> tuple[str, str]:
        if limit.is_nan():  # a NaN cannot even be a dict key (sNaN has no hash)
            return _bound(op, limit)
        cached = self._limits.get((op, limit))
        if cached is None:
            cached = _bound(op, limit)
            if len(self._limits) > 4096:
                self._limits.clear()
            self._limits[(op, limit)] = cached
        return cached

    def _forked(self) -> None:
        """(Re)start what belongs to one process: ids, owner, connections."""
        with self._lock:
            pid = os.getpid()
            if pid == self._pid:
                return
            if self._pid:  # a fork: the parent's connections are not ours to use
                self._idle = []
                self._sides = {}
            self._owner = f"{socket.gethostname()}:{pid}"
            self._id_base = secrets.token_hex(8) + "."
            self._ids = itertools.count(1)
            self._pid = pid

    # --- round trips ---------------------------------------------------------------------

    def _args(self, ops: list[Op], commits: list[str]) -> list[str]:
        args = [self._key, str(len(commits)), *commits, str(len(ops))]
        for op in ops:
            args += op
        return args

    def _run(self, ops: list[Op]) -> list[Any]:
        """One script call on a sync connection, carrying the queued commits."""
        if os.getpid() != self._pid:
            self._forked()
        commits = self._commits.take()
        args = self._args(ops, commits)
        conn = self._checkout()
        send: Callable[[list[bytes]], None] = conn.send_packed_command
        try:
            try:
                send([_pack("EVALSHA", SCRIPT_SHA, 1, self._route, *args)])
                reply = conn.read_response()
            except redis.exceptions.NoScriptError:
                send([_pack("EVAL", SCRIPT, 1, self._route, *args)])
                reply = conn.read_response()
        except redis.exceptions.ResponseError as exc:  # the connection is fine
            self._idle.append(conn)
            self._commits.put_back(commits)
            raise self._failure(exc) from exc
        except BaseException as exc:
            _disconnect(conn)
            self._commits.put_back(commits)
            if isinstance(exc, Exception):
                raise self._failure(exc) from exc
            raise
        self._idle.append(conn)
        return list(reply)

    def _checkout(self) -> redis.connection.AbstractConnection:
        """An idle connection, reopened if the server closed it (killed, restarted), or a new one.

        Checked before use, not retried after: a script that may have run is never sent twice.
        """
        try:
            conn: redis.connection.AbstractConnection = self._idle.pop()
        except IndexError:
            conn = self._sync_class(**self._sync_options)
            return conn
        sock = getattr(conn, "_sock", None)
        try:
            stale = sock is not None and _stale(sock.fileno())
        except (OSError, ValueError):
            stale = True
        if stale:
            _disconnect(conn)
        return conn

    async def _submit(self, op: Op) -> Any:
        """Queue one operation for this loop's next script call and wait for its reply."""
        loop = asyncio.get_running_loop()
        side = self._sides.get(loop)
        if side is None or side.closed:
            side = await self._new_side(loop)
        future: asyncio.Future[Any] = loop.create_future()
        side.queue.append((op, future))
        if not side.scheduled and side.in_flight < _IN_FLIGHT:
            side.scheduled = True
            loop.call_soon(self._flush, side)
        return await future

    def _flush(self, side: _Side) -> None:
        side.scheduled = False
        if not side.queue or side.in_flight >= _IN_FLIGHT or side.closed:
            return
        batch, side.queue = side.queue[:_BATCH], side.queue[_BATCH:]
        side.in_flight += 1
        task = side.loop.create_task(self._send(side, batch))
        side.tasks.add(task)
        task.add_done_callback(side.tasks.discard)

    async def _send(self, side: _Side, batch: list[tuple[Op, asyncio.Future[Any]]]) -> None:
        try:
            try:
                replies = await self._around(side, [op for op, _ in batch])
            except BaseException as exc:
                for _, future in batch:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:  # cancelled (the loop is closing): so are the calls waiting on it
                        future.cancel()
                if not isinstance(exc, Exception):
                    raise
            else:
                for (_, future), reply in zip(batch, replies, strict=True):
                    if not future.done():
                        future.set_result(reply)
        finally:
            side.in_flight -= 1
            if side.queue and not side.scheduled and not side.closed:
                side.scheduled = True
                side.loop.call_soon(self._flush, side)

    async def _around(self, side: _Side, ops: list[Op]) -> list[Any]:
        """One script call on one of this loop's connections, carrying the queued commits."""
        if os.getpid() != self._pid:
            self._forked()
        commits = self._commits.take()
        args = self._args(ops, commits)
        conn = self._acheckout(side)
        try:
            deadline = self.timeout if conn.is_connected else self.connect_timeout + self.timeout
            async with asyncio.timeout(deadline):
                try:
                    await conn.send_packed_command(
                        [_pack("EVALSHA", SCRIPT_SHA, 1, self._route, *args)]
                    )
                    reply = await conn.read_response()
                except redis.exceptions.NoScriptError:
                    await conn.send_packed_command([_pack("EVAL", SCRIPT, 1, self._route, *args)])
                    reply = await conn.read_response()
        except redis.exceptions.ResponseError as exc:  # the connection is fine
            self._put_back(side, conn)
            self._commits.put_back(commits)
            raise self._failure(exc) from exc
        except BaseException as exc:
            side.conns.discard(conn)
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            self._commits.put_back(commits)
            if isinstance(exc, Exception):
                raise self._failure(exc) from exc
            raise
        self._put_back(side, conn)
        return list(reply)

    @staticmethod
    def _put_back(side: _Side, conn: redis.asyncio.connection.AbstractConnection) -> None:
        if side.closed:  # closed while this call was out: nobody else will close it
            side.conns.discard(conn)
            _drop_connection(conn)
        else:
            side.idle.append(conn)

    def _acheckout(self, side: _Side) -> redis.asyncio.connection.AbstractConnection:
        """An idle connection of this loop that the server has not closed, or a new one."""
        while side.idle:
            conn = side.idle.pop()
            writer = getattr(conn, "_writer", None)
            if writer is None:  # not connected: it connects when it sends
                return conn
            try:
                sock = writer.get_extra_info("socket")
                if not writer.is_closing() and sock is not None and not _stale(sock.fileno()):
                    return conn
            except (OSError, ValueError):
                pass
            side.conns.discard(conn)
            _drop_connection(conn)
        new: redis.asyncio.connection.AbstractConnection = self._async_class(**self._async_options)
        side.conns.add(new)
        return new

    def _failure(self, exc: BaseException) -> StateStoreError:
        """The operator's message for a driver error: which server, what failed."""
        if isinstance(exc, StateStoreError):
            return exc
        if isinstance(exc, redis.exceptions.AuthenticationError):
            message = f"Redis at {self.server} refused the credentials: {exc}"
        elif isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
            message = (
                f"Redis at {self.server} did not answer in time (connect_timeout "
                f"{self.connect_timeout:g} s, timeout {self.timeout:g} s): {exc or 'timed out'}"
            )
        elif isinstance(exc, redis.exceptions.ConnectionError | OSError):
            message = f"Redis at {self.server} is unreachable: {_reason(exc)}"
        elif isinstance(exc, redis.exceptions.ResponseError):
            message = f"Redis at {self.server} refused the operation: {exc}"
        elif isinstance(exc, UnicodeError):
            message = f"cannot send to Redis at {self.server}: {exc}"
        else:
            message = f"Redis at {self.server} failed: {exc!r}"
        if self._password:
            message = message.replace(self._password, "***")
        return StateStoreError(message)

    # --- event loops ---------------------------------------------------------------------

    async def _new_side(self, loop: asyncio.AbstractEventLoop) -> _Side:
        with self._lock:  # loops of other threads add and drop theirs meanwhile
            finished = [s for s in self._sides.values() if s.loop.is_closed()]
            side = self._sides[loop] = _Side(loop)
        for other in finished:
            self._close_side(other)  # a finished loop's connections: closed here, not leaked
        watch = self._watch(side)
        side.watch = watch
        await watch.__anext__()
        return side

    async def _watch(self, side: _Side) -> AsyncIterator[None]:
        """Suspended for the loop's lifetime: its shutdown closes this side's connections.

        ``asyncio.run`` and ``asyncio.Runner`` close every async generator before closing
        the loop (``shutdown_asyncgens``), so the connections close while the loop can
        still run their shutdown.
        """
        try:
            yield
        finally:
            if not side.closed:
                self._forget(side)
                await self._disconnect(side)

    def _forget(self, side: _Side) -> None:
        side.closed = True
        with self._lock:
            if self._sides.get(side.loop) is side:
                del self._sides[side.loop]
        for _, future in side.queue:
            if not future.done():
                future.set_exception(StateStoreError("the Redis store was closed"))
        side.queue = []

    @staticmethod
    async def _disconnect(side: _Side) -> None:
        conns, side.conns, side.idle = list(side.conns), set(), []
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    def _close_side(self, side: _Side) -> None:
        """Close a loop's connections from sync code, whatever state that loop is in."""
        if side.closed and not side.conns:
            return
        self._forget(side)
        watch, side.watch = side.watch, None
        if watch is not None:
            _finish(watch)
        conns, side.conns, side.idle = list(side.conns), set(), []
        loop = side.loop
        if not conns:
            return
        if loop.is_closed():
            for conn in conns:
                _drop_connection(conn, hard=True)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None and not loop.is_running():
            with contextlib.suppress(Exception):
                loop.run_until_complete(_disconnect_all(conns))
                return
        if running is loop or not loop.is_running():
            for conn in conns:
                _drop_connection(conn)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_drop_connections, conns)


def _disconnect(conn: redis.connection.AbstractConnection) -> None:
    """Close a sync connection (it opens again when next used); never raises."""
    with contextlib.suppress(Exception):
        conn.disconnect()  # type: ignore[no-untyped-call]


def _drop_connections(conns: list[redis.asyncio.connection.AbstractConnection]) -> None:
    for conn in conns:
        _drop_connection(conn)


async def _disconnect_all(conns: list[redis.asyncio.connection.AbstractConnection]) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            await conn.disconnect()


def _finish(watch: AsyncIterator[None]) -> None:
    """Close a suspended watch generator synchronously: its side is closed already, so its
    ``finally`` has nothing to await and the generator ends at once (``StopIteration``)."""
    closing = watch.aclose()  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        closing.send(None)
        closing.close()  # pragma: no cover - only if it awaited after all


def _drop_connection(
    conn: redis.asyncio.connection.AbstractConnection, *, hard: bool = False
) -> None:
    """Close an async connection without awaiting (the loop finishes the close later).

    ``hard``: its loop is closed and will not run again, so close the socket itself.
    """
    writer = getattr(conn, "_writer", None)
    if writer is None:
        return
    transport = writer.transport
    with contextlib.suppress(Exception):
        if hard:
            with contextlib.suppress(RuntimeError):  # the closed loop cannot schedule it
                transport.close()
            sock = getattr(transport, "_sock", None)
            if sock is not None:
                sock.close()
                transport._sock = None
        else:
            writer.close()
    conn._writer = conn._reader = None


def _pack(*args: str | int) -> bytes:
    """One command in the Redis protocol (hiredis packs it in C; a long batch has many)."""
    if _hiredis_pack is not None:
        return _hiredis_pack(args)
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _reason(exc: BaseException) -> str:
    """The operating system's words for a connection failure, else the driver's."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__
