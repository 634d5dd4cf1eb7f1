"""help(surgery.inject) documents every registered method and each of its config keys."""

from __future__ import annotations

import dataclasses
import pydoc
import textwrap

import surgery
from surgery.help import field_docs, method_help
from surgery.methods import METHODS


def test_every_method_and_config_key_is_in_injects_docstring():
    doc = surgery.inject.__doc__
    assert doc.startswith("Inject `method`")  # the hand-written part stays first
    for name, method in METHODS.items():
        entry = method_help(method)
        assert textwrap.indent(entry, "    ") in doc
        assert f"{name!r}: " in doc
        meanings = field_docs(method.Config)
        for f in dataclasses.fields(method.Config):
            assert f"\n    {f.name}: " in entry, (name, f.name)
            # every key has a meaning: a Config field added without one fails here
            assert meanings.get(f.name), f"{name}.{f.name} has no entry in {method.Config.__name__}'s Attributes:"
        assert set(meanings) <= {f.name for f in dataclasses.fields(method.Config)}, name


def test_help_renders_types_defaults_and_meanings():
    text = pydoc.render_doc(surgery.inject, renderer=pydoc.plaintext)
    assert "'lora': LoRA" in text
    assert "r: int = 8" in text and "rank of the update" in text
    assert "n_tokens: int | None = None" in text and "number of prompt vectors (required)" in text


def test_field_docs_continuation_lines_and_refresh():
    @dataclasses.dataclass
    class Cfg:
        """Attributes:
        a: first line
            and its continuation.
        b: second.
        """

        a: int = 1
        b: str = "x"

    assert field_docs(Cfg) == {"a": "first line and its continuation.", "b": "second."}
    before = surgery.inject.__doc__
    surgery.help.document(surgery.inject)  # refreshing does not stack a second copy
    assert surgery.inject.__doc__ == before
