"""Test and diagnostic instruments (no training code depends on them): the multi-process harness
(``local_ranks``) and the host-sync counter (``sync_census``)."""
