"""Differential testing of optc against eager PyTorch (``optc fuzz``, ``tests/fuzz``; docs/fuzzing.md).

Random valid models:

- :mod:`.spec`: what a model is (:class:`ModelSpec`, :class:`Op`);
- :mod:`.choosers`: where the generator's choices come from (a seed, a replayed sequence, hypothesis);
- :mod:`.kinds`: the op kinds (:data:`KINDS`), a (gen, emit) pair each, one module per family;
- :mod:`.draw`: drawing a valid spec (:func:`random_spec`, the hypothesis strategy :func:`model_specs`);
- :mod:`.shrink`: shrinking a failing model on its choice sequence (:func:`shrink_choices`);
- :mod:`.source`: a spec as standalone Python source, and the model and inputs built from it.

Checking them:

- :mod:`.results`: the comparison (:func:`output_errors`), :class:`Mismatch`, :class:`OracleResult`;
- :mod:`.oracle`: one model through every target, compared with eager (:func:`oracle`);
- :mod:`.known_issues`: mismatches that are understood (:data:`KNOWN_ISSUES`);
- :mod:`.reproducer`: a standalone reproducer folder for a mismatch (:func:`write_reproducer`);
- :mod:`.report`: a campaign's counts (:class:`CampaignReport`);
- :mod:`.campaign`: models drawn from seeds for a time, new mismatches shrunk (:func:`campaign`);
- :mod:`.cli`: ``optc fuzz``.

The names below are the package's interface (``from optc.tools.fuzz import oracle, ModelSpec``);
"""

from optc.tools.fuzz.campaign import campaign, code_digest, parallel_campaign, shrink_mismatch
from optc.tools.fuzz.choosers import Chooser, GeneChooser, RandomChooser, ReplayChooser
from optc.tools.fuzz.cli import add_fuzz_parser, cmd_fuzz
from optc.tools.fuzz.draw import GENE, draw_spec, model_specs, random_spec, random_spec_choices, spec_from_choices
from optc.tools.fuzz.kinds import ANY, KINDS, Emit, Gen, Kind, kind
from optc.tools.fuzz.known_issues import KNOWN_ISSUES, KnownIssue, known_issue
from optc.tools.fuzz.oracle import (DEFAULT_BACKENDS, FACTOR, FLOAT64_AGREE, FLOOR, N_INPUT_SETS, ROUNDING_MAX, oracle,
                                    run_oracle, run_target, target_names)
from optc.tools.fuzz.report import CampaignReport, Finding, report_json
from optc.tools.fuzz.reproducer import reproduces, write_reproducer
from optc.tools.fuzz.results import STATUSES, Mismatch, OracleResult, output_errors
from optc.tools.fuzz.shrink import shrink_choices
from optc.tools.fuzz.source import build_model, emit_source, load_source, make_inputs
from optc.tools.fuzz.spec import MAX_NUMEL, MAX_OPS, ModelSpec, Op

__all__ = [
    # the generator
    "MAX_NUMEL", "MAX_OPS", "ModelSpec", "Op", "Chooser", "RandomChooser", "ReplayChooser", "GeneChooser",
    "ANY", "KINDS", "Kind", "Gen", "Emit", "kind", "GENE", "draw_spec", "random_spec", "random_spec_choices",
    "spec_from_choices", "model_specs", "shrink_choices", "emit_source", "load_source", "build_model", "make_inputs",
    # the oracle, known issues, reproducers
    "FACTOR", "FLOOR", "N_INPUT_SETS", "DEFAULT_BACKENDS", "STATUSES", "ROUNDING_MAX", "FLOAT64_AGREE",
    "output_errors", "Mismatch", "OracleResult", "target_names", "run_target", "run_oracle", "oracle",
    "KnownIssue", "KNOWN_ISSUES", "known_issue", "reproduces", "write_reproducer",
    # the campaign and the command line
    "Finding", "CampaignReport", "report_json", "code_digest", "campaign", "parallel_campaign", "shrink_mismatch",
    "add_fuzz_parser", "cmd_fuzz",
]
