"""The store against a plain dict: any mix of changes, restarts, compactions and handles agrees.

Run on both backends. Two handles share one file or one database, as two
gunicorn workers (or hosts) do; each step acts through one of them, and after
every step both must read exactly the model. Every string (field names,
values; keys too on the text database) is arbitrary Unicode, lone surrogates too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from helpers import namespaced_url, open_store, record_lines
from secure_app.store.postgres import storable

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
records = st.dictionaries(
    any_text,
    st.one_of(any_text, st.integers(), st.none(), st.lists(any_text, max_size=3)),
    max_size=5,
)
handle = st.integers(min_value=0, max_value=1)


class StoreMachine(RuleBasedStateMachine):
    """Set ``server`` to a PostgreSQL URL to run on it; None runs on the text database."""

    server: str | None = None
    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        # A folder (or schema) per run: function-scoped fixtures would be shared by every example.
        self.tmp = Path(tempfile.mkdtemp(prefix="store-machine-"))
        self.spec = (
            str(self.tmp) if self.server is None else namespaced_url(self.server, str(self.tmp))
        )
        self.handles = [self._open(), self._open()]
        self.model: dict[str, dict] = {}

    def _open(self):
        store = open_store(self.spec)
        if self.server is None:
            store.compact_min_dead = 3  # compact often, so compaction meets every other step
        return store

    @rule(target=keys, key=any_text)
    def new_key(self, key):
        # PostgreSQL's text type holds no NUL and no lone surrogate (keys are usernames).
        return key if self.server is None or storable(key) else "key"

    @rule(h=handle, key=keys, record=records)
    def create(self, h, key, record):
        created = self.handles[h].create(key, record)
        assert created == (key not in self.model)
        if created:
            self.model[key] = record

    @rule(h=handle, key=keys, field=any_text, value=any_text)
    def update(self, h, key, field, value):
        try:
            saved = self.handles[h].update(key, lambda r: r.update({field: value}))
        except KeyError:
            assert key not in self.model
            return
        self.model[key] = {**self.model[key], field: value}
        assert saved == self.model[key]

    @rule(h=handle, key=keys, record=records)
    def replace(self, h, key, record):
        """A change may return a new record instead of mutating its argument."""
        try:
            self.handles[h].update(key, lambda r: record)
        except KeyError:
            assert key not in self.model
            return
        self.model[key] = record

    @rule(h=handle, key=keys)
    def delete(self, h, key):
        assert self.handles[h].delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(h=handle)
    def restart(self, h):
        """A new store object on the same file, as after a server restart."""
        self.handles[h].close()
        self.handles[h] = self._open()

    @precondition(lambda self: self.model)
    @rule(h=handle)
    def compact(self, h):
        self.handles[h].compact()

    @invariant()
    def both_handles_agree_with_the_model(self):
        for store in self.handles:
            assert sorted(store.keys()) == sorted(self.model)
            assert len(store) == len(self.model)
            for key, record in self.model.items():
                assert key in store
                assert store.get(key) == record

    def teardown(self):
        try:
            path = self.tmp / "users.jsonl"
            if path.exists():  # still one valid JSON object a line, in valid UTF-8
                path.read_bytes().decode("utf-8")
                for line in record_lines(path):
                    json.loads(line)
        finally:
            for store in self.handles:
                store.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


# Short runs in the quick profile; long ones when HYPOTHESIS_PROFILE=thorough.
THOROUGH = settings.default.max_examples > 100


def test_store_matches_a_dict(backend):
    server = None
    if backend.name == "postgres":
        server = backend.spec.split("?")[0]
    machine = type("Machine", (StoreMachine,), {"server": server})
    run_state_machine_as_test(
        machine,
        settings=settings(settings.default, stateful_step_count=100 if THOROUGH else 30),
    )
