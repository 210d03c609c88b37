"""Shared by `lamol`, `pseudo_replay` and `ssr`: generative rehearsal with pseudo-rows instead of real rows.

Not a method (it registers nothing): `rows.py` holds the text side as pure functions (alpaca rows,
the few-shot prompt and its parser, counting malformed and duplicate generations), `files.py` the
pseudo-row files in `<output_dir>/pseudo/` and the method state saved with each task, `base.py` the
`Seq` subclass the three methods build on (seeded generation, reuse on resume, mixing, saving).
See docs/methods/lamol.md, docs/methods/pseudo_replay.md and docs/methods/ssr.md.
"""
