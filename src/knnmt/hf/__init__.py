"""Layer 3, Hugging Face: the only code that knows transformers' internals. The architecture registry
(:mod:`.registry`: where the kNN key is read, model identity), activation capture (:mod:`.capture`),
teacher forcing (:mod:`.teacher_forcing`), the kNN ``LogitsProcessor`` (:mod:`.logits_processor`),
beam tracking (:mod:`.beam_tracking`) and tiny offline models for tests and the demo (:mod:`.toy`).
Imports ``search``, ``knn``, ``store`` and ``core``."""
