"""Layer 4, the pipeline: what a user runs, built from the layers below. Building the datastore and
the Subset index from a model (:mod:`.build`), the front door :class:`~.translator.KNNMT`
(:mod:`.translator`), the domain gate (:mod:`.domain_gate`), tuning (:mod:`.tuning`) and evaluation
(:mod:`.evaluation`)."""
