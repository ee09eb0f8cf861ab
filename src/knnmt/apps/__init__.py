"""Layer 5, applications on top of the pipeline: the command line (:mod:`.cli`), the HTTP service
(:mod:`.service`) and the bundled demo (:mod:`.demo`)."""
