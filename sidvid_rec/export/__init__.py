"""Export a trained run for retrieval (:mod:`.writer`), its format (:mod:`.format`), and the
serving side that verifies and loads it (:mod:`.serving`; COBRA decoding: :mod:`.cobra`)."""
