"""Layer 1, storage: parallel-corpus reading (:mod:`.corpus`), the on-disk datastore format, its reader
and shard writer (:mod:`.datastore`) and the one-writer lock (:mod:`.writelock`). Only ``core`` below."""
