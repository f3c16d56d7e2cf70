"""Declarative policy documents and their typed models.

Each document kind has a pydantic model in its own module and a default document under
``policies/defaults/``. Loading goes through :func:`policies.base.load_document`, which turns any
validation failure into an :class:`sre_core.InputError` naming the file, the path inside the
document and what was expected.
"""

from policies.base import PolicyModel, load_default, load_document, parse_document

__all__ = ["PolicyModel", "load_default", "load_document", "parse_document"]
