"""Test and benchmark fixtures built offline from the bundled assets: tiny LLaMA models and tokenizers
(``tiny``), a corpus with planted near-duplicates (``dedup_corpus``) and other real-prose corpora (``corpora``).
The library never imports this package (a test checks); the tests and benches do."""
