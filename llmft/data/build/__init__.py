"""``llmft data build``: a data-mix recipe -> packed, shuffled training rows on disk, with stats and plots.

Pipeline, per source: read documents (:mod:`llmft.data.sources`), decontaminate, filter (``filters``, batch by
batch as they are read), deduplicate (``dedup``: two readings, see below), tokenize (prompt masked; in
``num_proc`` worker processes when the mix asks, with the same output as one process),
filter by token count, cut every document into units of at most ``seq_len`` tokens, written to a per-source spill
in the staging directory (:mod:`llmft.data.units`: 3 bytes per token on disk, 16 bytes per unit in memory), and
hold out the tail ``validation_fraction`` of the units for validation (``validation_sources`` are held out whole).

Dedup (:class:`~llmft.data.build.curate._Dedup`) never holds the texts: a first reading of every source (the scan)
computes each kept document's features in the workers (exact hash, MinHash signature, shingles) into a
:class:`llmft.data.dedup.DedupIndex` (in memory: ``num_perm * 4`` bytes per document while deciding, under 100 bytes
otherwise; the shingles and excerpts spill to the staging directory); the duplicates are decided over all of them; a
second reading yields only the documents kept (by their position in the reading order; a file changed in between is an
error) and counts the tokens of the removed ones for the report. A plain source's ``min_tokens`` / ``max_tokens`` run in
the scan (its workers count each document's tokens), so a document they drop takes no place in the index: a web source
where most documents are under Together's 2K tokens costs signatures only for the rest.

When a source's need is known before it is read (``total_tokens`` with weighted shares), its files are read in a
seeded random order and reading stops once its units hold the ``weight * total`` training tokens it needs (character
budgets, see :func:`_source_units`): a source 20x larger than its share is read about 1/20 (plus 2% and the rest of
the last file started), in whole files, so a sharded corpus is sampled by shard. Filtered documents simply take more
reading. With dedup the scan stops at the need at the source's measured characters per token plus ``SCAN_MARGIN``;
if the kept documents then hold too few tokens, the scan reads on and the decision is taken again over everything
scanned (the sources whose kept documents changed are tokenized again), so the result depends only on the data and
the seed. Duplicates are then found among what was read, which is what the rows are made of. ``stats.json`` records
per source the files and bytes read of the total (``read_fraction``) and whether it was read whole. Otherwise every
source is read whole.

Then, over the mix: each source contributes ``weight * total`` tokens (``shares: natural``: in proportion to its
size), made of whole passes over its units plus a seeded random part-pass (at most ``max_epochs`` passes). The
units of all sources are shuffled together (an index per unit), read back from the spills in that order, packed
(``concat`` or ``isolated``) and written a window of ``PACK_WINDOW_TOKENS`` at a time
(:func:`llmft.data.packing.pack_stream`). The build's memory therefore does not grow with the corpus or the
mix beyond per-unit and per-document numbers: a window of rows, the jobs in flight, 16 bytes per unit, dedup's
features, the reweighting's per-document numbers and samples, and the validation tokens.

Output directory (written in ``OUT/.staging-<pid>/`` and published into ``OUT`` only once complete, ``stats.json``
last: a build that fails or is interrupted leaves the previous build as it was, or no loadable one, never a mix)::

    OUT/
      rows/                     the packed rows, read a batch at a time by training (:mod:`llmft.data.store`): token ids
                                (uint16 when the vocabulary allows, else int32), trained-token and segment-start
                                bits, per-token weights with ``reweight``; 2.25 bytes per token with a 16-bit vocabulary
      validation.parquet        the held-out tokens, one row per source
      stats.json                everything measured (see below) + the build fingerprint
      length_histogram.png, mix.png
      dedup.json, dedup.md      the deduplication report (with ``dedup``; also under "dedup" in stats.json)
      filters.md                what each filter removed, and the reweighting (with ``filters``; also under
                                "filters" and "reweight" in stats.json)

With ``filters`` (:mod:`llmft.data.filters`) documents are filtered as they are read, before deduplication. With
``reweight`` (:mod:`llmft.data.reweight`, :class:`~llmft.data.reweight.ReweightStream`) they are filtered after
deduplication, as the source is read and tokenized, and every document read, kept or not, is embedded into a spill
in the staging directory (17 bytes per document in memory); once the source is read (to its need, when sampled),
the probe is fitted on a sample of those embeddings and scores the kept ones, and each unit gets its document's
weight, carried through selection and packing into ``rows/weight.bin`` (float32 per token, 0 on padding). Training
on the build weighs each token's loss by the weight of the predicted token: a step's loss is Σ w·nll / Σ w over
its trained tokens, so a weight of 2 counts exactly as two copies of the document (:mod:`llmft.train.loss`).

The fingerprint hashes the resolved mix recipe (the ``dedup`` settings included, but not the code of a custom
embedder; except ``num_proc`` and ``engine``: the output does not depend on them), the tokenizer's vocabulary,
seq_len and every input file's path, size and modification time. Rebuilding with the same fingerprint reads
stats.json and does no work.

With an ``engine`` section (:mod:`llmft.data.engine`), the per-file stages (read, clean, decontaminate, filter,
UL2, tokenize, dedup features) run as datatrove tasks, locally or on a cluster, and the per-source loop below takes
their prepared documents in the same order (dedup's scan replays over their features, its second reading takes the
kept documents from the prepared files): the same rows. UL2 draws each document's randomness from its own seeded stream
(:func:`doc_rng`), so a document is transformed the same whichever process reads it.


Modules: :mod:`~llmft.data.build.pipeline` (the build, source by source, then the mix), :mod:`~.reading` (a source
read as the build reads it), :mod:`~.curate` (dedup and the curation without tokenizing), :mod:`~.tokenizing`
(examples, worker processes), :mod:`~.output` (the output directory, ``load_built``), :mod:`~.common` (tunables,
progress).
"""

from llmft.data.build.curate import Curated, curate_recipe, dedup_recipe
from llmft.data.build.output import Built, load_built
from llmft.data.build.pipeline import build, build_from_recipe, fingerprint, tokenizer_hash
from llmft.data.build.reading import doc_rng
from llmft.data.build.tokenizing import encode_documents

__all__ = ["Built", "Curated", "build", "build_from_recipe", "curate_recipe", "dedup_recipe", "doc_rng",
           "encode_documents", "fingerprint", "load_built", "tokenizer_hash"]
