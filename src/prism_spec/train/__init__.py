"""Drafter training: data readers, chat rendering with loss masks, response regeneration,
target feature capture and batching. Import the submodules directly (``prism_spec.train.records``,
``.conversations``, ``.mix``, ``.chat``, ``.regenerate``, ``.features``, ``.batching``, ``.loop``);
nothing heavy is imported here."""
