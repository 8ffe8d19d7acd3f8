"""Knobs of ``onnxcompress tune`` itself, declared once (:mod:`onnxcompress.params`): the search
(:mod:`onnxcompress.tune`) and ``tune``'s flags read these. A light module: the CLI imports it at
start-up."""

from __future__ import annotations

from .params import Param

SENSITIVITY_NODES = Param("sensitivity_nodes", 8, "How many of the nodes with the lowest int8 output SQNR tune "
                          "measures with the budget's metric before the search, each kept in float alone in "
                          "static int8 (one optimize and one scoring each, up to 15 % of --time-budget, before the "
                          "search); those whose metric that raises go first in keep_float's order. 0: SQNR order "
                          "only.",
                          kind="int", low=0)
#: share of ``--time-budget`` the measured sensitivity may take
SENSITIVITY_TIME_SHARE = 0.15
SENSITIVITY_GROUPS = Param("sensitivity_groups", 16, "How many channel-pruning dependency groups tune measures "
                           "before the search, the largest by MACs first: each pruned alone at 50 % (least-squares "
                           "repair included) and scored with the budget's metric (up to 15 % of --time-budget, before "
                           "the search). Their order, most sensitive first, picks the groups a channel-pruning trial "
                           "prunes (prune_groups: all, spare-K, least-K). 0: every group is pruned alike.",
                           kind="int", low=0)
#: share of ``--time-budget`` the measured pruning sensitivity may take
PRUNE_SENSITIVITY_TIME_SHARE = 0.15
#: the share of its channels a group loses when its pruning sensitivity is measured
PRUNE_PROBE_RATIO = 0.5
