"""Drafter training: data readers, chat rendering with loss masks, response regeneration,
target feature capture and batching. Import the submodules directly (``prism_spec.train.data``,
``.chat``, ``.regenerate``, ``.features``, ``.batching``); nothing heavy is imported here."""
