"""GraphCache bookkeeping on the CPU: LRU order, capacity, eviction, remove, purge, thread safety.

Values are plain objects that record their release() calls, so every test can say exactly which captured
step would have been freed and how many times. The engine-level tests check RTDIFFUSION_GRAPH_CACHE.
"""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest

from rtdiffusion.engine import GraphCacheControl

from engines.graph import GraphCache
from rtdiffusion.errors import ConfigError


class Entry:
    """Stands in for a CapturedFrame: counts release() calls (thread-safe) and stamps the first one with a
    tick of one clock shared by all entries (``Entry.tick()``), so a test can order a release and a get."""

    _lock = threading.Lock()
    _clock = itertools.count()

    def __init__(self, name):
        self.name = name
        self.released = 0
        self.released_at: int | None = None

    @staticmethod
    def tick() -> int:
        with Entry._lock:
            return next(Entry._clock)

    def release(self):
        with Entry._lock:
            self.released += 1
            if self.released_at is None:
                self.released_at = next(Entry._clock)

    def __repr__(self):
        return f"Entry({self.name!r}, released={self.released})"


def filled(capacity, keys):
    cache = GraphCache(capacity)
    entries = {k: Entry(k) for k in keys}
    for k in keys:
        cache.put(k, entries[k])
    return cache, entries


# ---------------------------------------------------------------------------------------------- LRU order
def test_keys_are_least_recently_used_first_and_get_refreshes():
    cache, e = filled(4, ["a", "b", "c"])
    assert cache.keys() == ["a", "b", "c"]
    assert cache.get("a") is e["a"]
    assert cache.keys() == ["b", "c", "a"]
    assert list(cache) == ["b", "c", "a"]  # iteration is keys() order


def test_get_of_a_missing_key_returns_none_and_changes_nothing():
    cache, e = filled(4, ["a", "b"])
    assert cache.get("zzz") is None
    assert cache.keys() == ["a", "b"]
    assert all(v.released == 0 for v in e.values())


def test_put_refreshes_an_existing_key_to_most_recent():
    cache, e = filled(4, ["a", "b", "c"])
    cache.put("a", e["a"])  # the same value again: a refresh, not a replacement
    assert cache.keys() == ["b", "c", "a"]
    assert e["a"].released == 0


def test_membership_and_len():
    cache, _ = filled(4, ["a", ("layout", 512, 2)])
    assert "a" in cache and ("layout", 512, 2) in cache
    assert "b" not in cache and ("layout", 512, 1) not in cache
    assert len(cache) == 2
    assert "a" in cache and cache.keys() == ["a", ("layout", 512, 2)]  # a membership test does not refresh


# ---------------------------------------------------------------------------------------------- capacity
def test_capacity_evicts_the_least_recently_used_and_releases_it_once():
    cache, e = filled(3, ["a", "b", "c"])
    cache.get("a")  # order now b, c, a
    d = Entry("d")
    cache.put("d", d)
    assert cache.keys() == ["c", "a", "d"]
    assert "b" not in cache
    assert e["b"].released == 1
    assert [e[k].released for k in "acd" if k in e] == [0, 0]
    assert d.released == 0
    cache.put("e", Entry("e"))  # next out: c
    assert cache.keys() == ["a", "d", "e"]
    assert e["c"].released == 1 and e["b"].released == 1  # b is not released again
    assert len(cache) == 3 == cache.capacity


def test_capacity_one_keeps_only_the_latest():
    cache, e = filled(1, ["a", "b", "c"])
    assert cache.keys() == ["c"]
    assert (e["a"].released, e["b"].released, e["c"].released) == (1, 1, 0)


def test_shrinking_capacity_evicts_least_recently_used_first():
    cache, e = filled(5, ["a", "b", "c", "d", "e"])
    cache.get("b")  # a c d e b
    cache.capacity = 2
    assert cache.capacity == 2
    assert cache.keys() == ["e", "b"]
    assert [e[k].released for k in "abcde"] == [1, 0, 1, 1, 0]
    cache.capacity = 10  # growing evicts nothing and releases nothing
    assert cache.keys() == ["e", "b"]
    assert [e[k].released for k in "abcde"] == [1, 0, 1, 1, 0]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", None])
def test_invalid_capacity_is_rejected_with_what_was_expected(bad):
    with pytest.raises(ValueError, match=r"integer >= 1.*got"):
        GraphCache(bad)
    cache, e = filled(3, ["a", "b"])
    with pytest.raises(ValueError, match=r"integer >= 1.*got"):
        cache.capacity = bad
    assert cache.capacity == 3 and cache.keys() == ["a", "b"]  # a rejected value changes nothing
    assert all(v.released == 0 for v in e.values())


# ---------------------------------------------------------------------------------------------- replace
def test_put_of_an_existing_key_replaces_and_releases_the_old_value():
    cache, e = filled(3, ["a", "b"])
    new_a = Entry("a2")
    cache.put("a", new_a)
    assert cache.get("a") is new_a
    assert e["a"].released == 1 and new_a.released == 0
    assert cache.keys() == ["b", "a"]
    assert len(cache) == 2


def test_values_without_release_are_allowed():
    cache = GraphCache(1)
    cache.put("a", object())
    cache.put("b", 123)  # evicts a plain object: nothing to release, no error
    assert cache.remove("b") is True
    assert len(cache) == 0


# ---------------------------------------------------------------------------------------------- remove / purge
def test_remove_returns_whether_the_key_was_there_and_releases():
    cache, e = filled(4, ["a", "b", "c"])
    assert cache.remove("b") is True
    assert e["b"].released == 1
    assert cache.keys() == ["a", "c"]
    assert cache.remove("b") is False  # already gone: not released again
    assert cache.remove("nope") is False
    assert e["b"].released == 1
    assert e["a"].released == 0 and e["c"].released == 0


def test_purge_n_drops_the_n_least_recently_used():
    cache, e = filled(5, ["a", "b", "c", "d", "e"])
    cache.get("a")  # b c d e a
    assert cache.purge(2) == 2
    assert cache.keys() == ["d", "e", "a"]
    assert [e[k].released for k in "abcde"] == [0, 1, 1, 0, 0]


def test_purge_more_than_held_zero_and_negative():
    cache, e = filled(5, ["a", "b", "c"])
    assert cache.purge(0) == 0
    assert cache.purge(-3) == 0
    assert cache.keys() == ["a", "b", "c"]
    assert cache.purge(10) == 3
    assert len(cache) == 0
    assert [v.released for v in e.values()] == [1, 1, 1]


def test_purge_all():
    cache, e = filled(4, ["a", "b", "c"])
    assert cache.purge() == 3
    assert cache.keys() == [] and len(cache) == 0 and "a" not in cache
    assert [v.released for v in e.values()] == [1, 1, 1]
    assert cache.purge() == 0  # an empty cache purges nothing
    assert [v.released for v in e.values()] == [1, 1, 1]
    cache.put("a", Entry("a"))  # still usable afterwards
    assert cache.keys() == ["a"]


# ---------------------------------------------------------------------------------------------- threads
def test_concurrent_get_put_remove_purge_capacity_stay_consistent():
    """Six threads hammer one cache for about a second; afterwards every value that left the cache was
    released exactly once, every value still in it never, and no thread saw an exception."""
    max_capacity = 6
    cache = GraphCache(4)
    keys = [f"k{i}" for i in range(10)]
    made: list[Entry] = []
    made_lock = threading.Lock()
    errors: list[BaseException] = []
    violations: list[str] = []
    stop = threading.Event()
    serial = itertools.count()

    def new_entry(key):
        e = Entry(f"{key}#{next(serial)}")
        with made_lock:
            made.append(e)
        return e

    def worker(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                op = rng.random()
                k = rng.choice(keys)
                if op < 0.40:
                    # Another thread may evict and release v between get() returning and the check below;
                    # that is allowed. What must never happen: get() returning a value whose release had
                    # already happened before get() was called.
                    before = Entry.tick()
                    v = cache.get(k)
                    if v is not None and v.released_at is not None and v.released_at < before:
                        violations.append(f"get returned a value released before the call: {v!r}")
                elif op < 0.75:
                    cache.put(k, new_entry(k))
                elif op < 0.90:
                    cache.remove(k)
                elif op < 0.96:
                    cache.purge(rng.randint(0, 3))
                elif op < 0.98:
                    cache.purge()
                else:
                    _ = (k in cache, cache.keys(), len(cache))
                if len(cache) > max_capacity:
                    violations.append(f"len {len(cache)} > largest capacity {max_capacity}")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def resizer():
        rng = random.Random(99)
        try:
            while not stop.is_set():
                cache.capacity = rng.randint(1, max_capacity)
                time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(5)]
    threads.append(threading.Thread(target=resizer, daemon=True))
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    assert not errors, errors
    assert not violations, violations[:5]
    assert len(cache) <= cache.capacity
    assert len(made) > 100, "the threads did too little work to test anything"
    held = {id(cache.get(k)) for k in cache.keys()}
    assert len(held) == len(cache)
    for e in made:
        assert e.released == (0 if id(e) in held else 1), e
    # and the cache is still usable: purge releases what is left, once each
    left = [e for e in made if id(e) in held]
    cache.purge()
    assert all(e.released == 1 for e in left)


# ---------------------------------------------------------------------------------------------- the engine
def test_engine_exposes_its_graph_cache(make_engine, monkeypatch):
    monkeypatch.delenv("RTDIFFUSION_GRAPH_CACHE", raising=False)
    engine = make_engine()
    assert isinstance(engine.graph_cache, GraphCacheControl) and engine.graph_cache._cache is engine._graphs
    g = engine.status()["graph_cache"]
    assert g["capacity"] == 4 == engine.graph_cache.capacity  # the default
    assert g["size"] == 0 and g["keys"] == [] and g["captures"] == 0  # eager on the CPU: nothing captured


@pytest.mark.parametrize("value, capacity", [("off", 1), ("OFF", 1), ("0", 1), ("on", 4), ("7", 7), ("", 4)])
def test_env_var_sets_the_capacity(make_engine, monkeypatch, value, capacity):
    monkeypatch.setenv("RTDIFFUSION_GRAPH_CACHE", value)
    engine = make_engine()
    assert engine.graph_cache.capacity == capacity
    assert engine.status()["graph_cache"]["capacity"] == capacity


@pytest.mark.parametrize("value", ["bogus", "-2", "4.5"])
def test_env_var_rejects_other_values_naming_the_allowed_ones(make_engine, monkeypatch, value):
    monkeypatch.setenv("RTDIFFUSION_GRAPH_CACHE", value)
    with pytest.raises(ConfigError) as info:
        make_engine()
    msg = str(info.value)
    assert "RTDIFFUSION_GRAPH_CACHE" in msg
    assert "'on'" in msg and "'off'" in msg and "capacity" in msg
    assert value in msg
