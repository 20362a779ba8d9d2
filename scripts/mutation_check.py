"""Does the test suite notice when the decision wiring breaks? Applies each one-line
mutation in MUTATIONS (exact text replacement) to a throw-away copy of the repository,
runs the default suite there, and reports whether the suite caught it (failed). A control
run without any mutation comes first and must pass. Every run starts from one snapshot of
the work tree taken at the start, so edits made meanwhile do not mix into the runs. A
developer tool, not part of the suite; it takes one suite run per mutation plus the
control.

    python scripts/mutation_check.py                 # control, then every mutation
    python scripts/mutation_check.py --only latency-guard-compares-candidate-with-itself
    python scripts/mutation_check.py -- tests/decide  # a narrower suite while iterating

Exit status: 0 when the control passes and every mutation is caught; 1 when a mutation
survives; 2 when the control fails or a mutation no longer applies (its text is not found
exactly once: update the table below)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mutation:
    """Replace `old` by `new` in the one file matched by `where` (a glob relative to the
    repository root) that contains it; `old` must occur exactly once among those files,
    so a module may move within its package without the table changing."""

    name: str
    where: str
    old: str
    new: str
    caught_by: str  # the test meant to catch it


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "boot-cv-ignores-remeasured-boots", "aevyra_forge/decide/*.py",
        "    return max(s.boot_cv(), between_boot_noise(boots).cv)\n",
        "    return s.boot_cv()\n",
        "tests/decide/test_verdict.py::"
        "test_incumbent_boots_that_disagree_widen_the_interval_and_refuse_the_keep"),
    Mutation(
        "pass-noise-not-pooled", "aevyra_forge/decide/*.py",
        "    return pooled_noise(groups) if len(groups) >= 2 else None\n",
        "    return None\n",
        "tests/decide/test_verdict.py::"
        "test_pass_noise_pooled_from_earlier_configs_decides_a_close_call"),
    Mutation(
        "latency-guard-compares-candidate-with-itself", "aevyra_forge/decide/*.py",
        "latency = latency_regressions(passes, incumbent,",
        "latency = latency_regressions(passes, passes,",
        "tests/decide/test_verdict.py::"
        "test_a_throughput_win_with_a_far_worse_tail_is_refused_by_the_latency_guard"),
    Mutation(
        "state-ignores-drift-checks", "aevyra_forge/loop/*.py",
        "rec.recipe_id == self.best.id and (rec.kept or rec.remeasure)",
        "rec.recipe_id == self.best.id and rec.kept",
        "tests/loop/test_state.py::"
        "test_a_drift_check_gives_the_incumbent_its_re_measured_passes"),
    Mutation(
        "failed-request-config-judged-ok", "aevyra_forge/decide/*.py",
        'if status != "ok" or median is None or not healthy(measured):',
        'if status != "ok" or median is None:',
        "tests/decide/test_verdict.py::"
        "test_an_ok_measurement_with_too_many_failed_requests_is_never_kept"),
    Mutation(
        "failed-request-record-takes-the-lead", "aevyra_forge/core/*.py",
        "    return healthy(record.passes or (record.metrics,))\n",
        "    return True\n",
        "tests/loop/test_state.py::"
        "test_a_kept_record_whose_requests_failed_never_takes_the_lead"),
    Mutation(
        "lossy-change-kept-without-accuracy", "aevyra_forge/decide/*.py",
        "    if accuracy is None and output_changes and best is not None:\n",
        "    if False:\n",
        "tests/decide/test_rules.py::"
        "test_a_change_that_can_alter_outputs_needs_an_accuracy_figure"),
    Mutation(
        "sequential-keep-at-the-final-confidence", "aevyra_forge/decide/stats.py",
        "    strict = relative_interval(candidate, incumbent, confidence=interim_confidence,",
        "    strict = relative_interval(candidate, incumbent, confidence=0.5,",
        "tests/decide/test_stats.py::"
        "test_a_clearly_worse_candidate_stops_after_two_passes_a_better_one_after_four"),
    Mutation(
        "sequential-drop-without-the-final-bar", "aevyra_forge/decide/stats.py",
        "math.log1p(now.high) < math.log1p(threshold) + final:",
        "math.log1p(now.high) < math.log1p(threshold):",
        "tests/decide/test_stats.py::"
        "test_a_clearly_worse_candidate_stops_after_two_passes_a_better_one_after_four"),
    Mutation(
        "diagnosis-memory-inert-despite-preemptions", "aevyra_forge/decide/diagnosis.py",
        '    roomy = ev.get("num_preemptions", 0.0) == 0 and (',
        "    roomy = (",
        "tests/decide/test_diagnosis.py::"
        "test_preemptions_bind_the_kv_cache_whatever_else_was_seen"),
    Mutation(
        "diagnosis-seqs-cap-below-concurrency", "aevyra_forge/decide/diagnosis.py",
        '            knob="max_num_seqs", at_least=c,',
        '            knob="max_num_seqs", at_least=c / 2,',
        "tests/decide/test_diagnosis.py::"
        "test_a_cap_above_the_requests_in_flight_is_inert_and_one_below_is_not"),
    Mutation(
        "builtin-plays-nil-moves", "aevyra_forge/agent/builtin.py",
        "            why = nil(diagnosis_of(ctx), changes) or off_lever(ctx, changes)\n",
        "            why = None\n",
        "tests/agent/test_builtin.py::"
        "test_moves_the_diagnosis_proves_nil_are_skipped_with_the_reason"),
    Mutation(
        "same-kernels-booted-again", "aevyra_forge/agent/moves.py",
        "    if now is None or then is None or (now.method, now.bits) != (then.method, then.bits):",
        "    if True:",
        "tests/agent/test_engine_model.py::"
        "test_the_incumbents_method_from_another_checkpoint_gets_no_boot"),
    Mutation(
        "dry-run-offers-prequantized-by-name", "aevyra_forge/space/quant.py",
        "    return method is not None and refusal(method.on_the_fly, hw) is None",
        "    return method is not None and refusal(method.on_the_fly if not simulated else "
        "method.checkpoint, hw) is None",
        "tests/space/test_quant.py::test_methods_usable_here"),
    Mutation(
        "failed-model-download-remembered-as-done", "aevyra_forge/engine/prepare.py",
        "            self.once.done = result.failure is None",
        "            self.once.done = True",
        "tests/engine/test_hub_fetch.py::"
        "test_a_gated_model_without_a_token_is_the_baselines_reason_and_asked_again"),
    Mutation(
        "model-download-time-dropped", "aevyra_forge/engine/prepare.py",
        "        return PrepareResult(model.seconds + own.seconds, own.reused, own.failure, "
        "own.log)",
        "        return PrepareResult(own.seconds, own.reused, own.failure, own.log)",
        "tests/engine/test_hub_fetch.py::test_the_first_trial_of_a_resumed_run_pays_for_both"),
    Mutation(
        "network-down-read-as-missing-file", "aevyra_forge/space/hub.py",
        "    if isinstance(exc, LocalEntryNotFoundError):",
        "    if False:",
        "tests/engine/test_hub_fetch.py::test_an_unreachable_hub_is_a_reason"),
    Mutation(
        "fp8-kv-offered-on-avx2", "aevyra_forge/space/quant.py",
        "    return not is_fp8_kv(str(choice)) or refusal(FP8_KV, hw) is None",
        "    return True",
        "tests/space/test_quant.py::test_layer_two_offers_an_fp8_kv_cache_on_an_avx512_cpu_only"),
    Mutation(
        "builtin-ignores-synonyms", "aevyra_forge/decide/diagnosis.py",
        '    if knob == "kv_cache_dtype" and space.hw.device == "cuda":',
        '    if knob == "kv_cache_dtype" and space.hw.device == "none":',
        "tests/decide/test_diagnosis.py::"
        "test_fp8_kv_cache_names_are_one_value_on_nvidia_only"),
    Mutation(
        "explicit-default-backend-not-a-synonym", "aevyra_forge/decide/diagnosis.py",
        "        return _unset_or(auto_attention_backend(space.hw), value)\n",
        "        return ()\n",
        "tests/decide/test_diagnosis.py::"
        "test_an_unset_attention_backend_is_the_one_vllm_picks_here"),
    Mutation(
        "default-capture-size-not-a-synonym", "aevyra_forge/decide/diagnosis.py",
        '    if knob == "max_cudagraph_capture_size" and recipe is not None:',
        '    if knob == "max_cudagraph_capture_size" and recipe is None:',
        "tests/agent/test_moves.py::"
        "test_explicit_defaults_are_not_fresh_once_the_default_was_measured"),
    Mutation(
        "earlier-layers-close-on-escalation", "aevyra_forge/agent/moves.py",
        "    return tuple(layer for layer in LAYERS if layer <= ctx.layer)\n",
        "    return tuple(layer for layer in LAYERS if layer == ctx.layer)\n",
        "tests/agent/test_engine_model.py::"
        "test_a_later_layer_still_proposes_an_earlier_layers_move"),
    Mutation(
        "tuner-refuses-an-earlier-layers-move", "aevyra_forge/loop/vet.py",
        "    if proposal.layer > layer:\n",
        "    if proposal.layer != layer:\n",
        "tests/loop/test_tuner.py::"
        "test_an_earlier_layers_knobs_stay_open_and_a_later_ones_stay_closed"),
    Mutation(
        "off-lever-rule-outlives-the-config-diagnosed", "aevyra_forge/agent/moves.py",
        "        and found is not None and found.recipe_id == ctx.best.id\n",
        "        and found is not None\n",
        "tests/agent/test_moves.py::test_the_off_lever_rule_lapses_once_a_move_was_kept"),
    Mutation(
        "unconfirmed-gain-never-paired", "aevyra_forge/agent/builtin.py",
        "            elif len(changes) == 1 and pairable(changes, observations):\n",
        "            elif False:\n",
        "tests/agent/test_engine_model.py::"
        "test_a_gain_measured_but_not_confirmed_is_paired_with_the_next_one"),
    Mutation(
        "search-boots-what-the-model-predicts-to-lose",
        "aevyra_forge/agent/builtin.py",
        "    return gain is not None and gain < -MIN_MODEL_GAIN\n",
        "    return False\n",
        "tests/agent/test_engine_model.py::"
        "test_with_a_model_no_boot_goes_to_a_move_it_predicts_to_lose"),
    Mutation(
        "an-early-keep-never-ends-its-bench", "aevyra_forge/decide/verdict.py",
        "    return look is not None\n",
        '    return look == "drop"\n',
        "tests/decide/test_verdict.py::"
        "test_the_stop_rule_carries_what_judge_will_use_and_decides_like_it"),
    Mutation(
        "an-early-keep-on-two-passes", "aevyra_forge/decide/stats.py",
        "    if n >= min_keep_passes:\n",
        "    if True:\n",
        "tests/decide/test_stats.py::"
        "test_a_clearly_worse_candidate_stops_after_two_passes_a_better_one_after_four"),
    Mutation(
        "early-verdict-silent-on-its-passes", "aevyra_forge/decide/verdict.py",
        "    if interval is not None and len(passes) < s.repeats:",
        "    if False:",
        "tests/decide/test_verdict.py::test_a_verdict_on_fewer_passes_than_asked_says_so"),
    Mutation(
        "loop-boots-a-nil-move", "aevyra_forge/loop/vet.py",
        "    why = nil(in_force(records, best.id), changes, wholly=True)\n",
        "    why = None\n",
        "tests/loop/test_vet.py::"
        "test_an_agents_nil_move_is_refused_with_the_diagnosis_and_costs_no_boot"),
    Mutation(
        "loop-blind-to-synonyms", "aevyra_forge/loop/vet.py",
        "        for other in synonyms(space, name, value, recipe):",
        "        for other in ():",
        "tests/loop/test_vet.py::test_another_name_for_a_measured_value_is_a_repeat"),
    Mutation(
        "builtin-blind-to-min-improvement", "aevyra_forge/agent/moves.py",
        "    return math.log1p(ctx.min_improvement) + _half_width(ctx) / 2\n",
        "    return MIN_MODEL_GAIN + _half_width(ctx) / 2\n",
        "tests/agent/test_engine_model.py::"
        "test_the_runs_minimum_improvement_decides_what_is_worth_a_boot"),
    Mutation(
        "agents-never-told-min-improvement", "aevyra_forge/loop/tuner.py",
        "            min_improvement=self.s.min_improvement_pct / 100,\n",
        "",
        "tests/loop/test_tuner.py::"
        "test_a_hand_over_shows_the_strategys_reason_and_it_sees_the_runs_floor"),
    Mutation(
        "nil-refused-after-the-incumbent-moved", "aevyra_forge/decide/diagnosis.py",
        "    if found is None or d is None or found.recipe_id == incumbent_id:\n",
        "    if found is None or d is None or True:\n",
        "tests/loop/test_vet.py::"
        "test_once_a_move_was_kept_only_what_the_workload_fixes_is_refused"),
    Mutation(
        "the-concurrency-cap-read-off-the-baseline-only", "aevyra_forge/decide/diagnosis.py",
        "            knob=\"max_num_seqs\", at_least=c, standing=True,",
        "            knob=\"max_num_seqs\", at_least=c,",
        "tests/loop/test_vet.py::"
        "test_once_a_move_was_kept_only_what_the_workload_fixes_is_refused"),
    Mutation(
        "prompt-silent-once-the-incumbent-moved", "aevyra_forge/agent/prompt.py",
        "    if d.binding != \"boot\" and found.recipe_id != ctx.best.id and still is not None:",
        "    if False:",
        "tests/agent/test_prompt.py::"
        "test_once_another_config_leads_the_prompt_says_which_knobs_still_cannot_matter"),
    Mutation(
        "a-partly-nil-move-refused", "aevyra_forge/decide/diagnosis.py",
        "    if wholly and not all(reasons):",
        "    if wholly and not any(reasons):",
        "tests/loop/test_vet.py::"
        "test_a_move_is_wholly_nil_only_when_every_knob_it_sets_is_inert"),
    Mutation(
        "keep-rule-back-at-95-percent", "aevyra_forge/core/settings.py",
        "DEFAULT_CONFIDENCE = 0.90\n",
        "DEFAULT_CONFIDENCE = 0.95\n",
        "tests/decide/test_stats.py::test_welch_interval_on_log_ratios_by_hand"),
    Mutation(
        "pass-isolation-ignores-the-hit-rates", "aevyra_forge/measure/isolation.py",
        "        r is not None and r - rates[0] > HIT_RATE_RISE for r in rates[1:])",
        "        r is not None and r - rates[0] > 1.0 for r in rates[1:])",
        "tests/measure/test_isolation.py::"
        "test_a_later_pass_hitting_the_first_ones_cache_is_a_leak"),
    Mutation(
        "pass-isolation-never-falls-back", "aevyra_forge/measure/client.py",
        "    if not config.isolation_fallback:\n",
        "    if True:\n",
        "tests/measure/test_isolation.py::"
        "test_an_ignored_salt_falls_back_to_resetting_the_cache"),
    Mutation(
        "unproven-kernel-plugin-is-measured", "aevyra_forge/engine/executor.py",
        "            if refused:  # what was asked",
        "            if False:  # what was asked",
        "tests/engine/test_executor.py::"
        "test_a_chosen_kernel_plugin_that_left_no_proof_is_a_failed_boot_not_benched"),
    Mutation(
        "installed-plugins-load-in-the-baseline", "aevyra_forge/engine/launcher.py",
        '"DO_NOT_TRACK": "1", "VLLM_PLUGINS": ""}',
        '"DO_NOT_TRACK": "1"}',
        "tests/space/test_plugins.py::"
        "test_an_installed_plugin_leaves_the_baseline_byte_identical"),
    Mutation(
        "plugin-proof-not-read", "aevyra_forge/space/plugins.py",
        "    if hits:\n        return None\n",
        "    if True:\n        return None\n",
        "tests/space/test_plugins.py::test_a_chosen_plugin_without_its_proof_line_is_unproven"),
    Mutation(
        "plugin-requirements-not-checked", "aevyra_forge/space/plugins.py",
        "        if missing or absent:",
        "        if False:",
        "tests/space/test_plugins.py::test_a_candidate_vllm_cannot_load_is_not_offered"),
    Mutation(
        "a-knob-that-needs-another-applies-alone", "aevyra_forge/space/knob_space.py",
        "                    and self.value(recipe, needed) == self.default(needed)):",
        "                    and False):",
        "tests/space/test_knob_space.py::test_speculative_tokens_come_and_go_with_the_method"),
    Mutation(
        "a-round-judged-against-the-incumbent-of-the-moment", "aevyra_forge/loop/tuner.py",
        "        inc = against or st.incumbent()\n",
        "        inc = st.incumbent()\n",
        "tests/loop/test_rounds.py::test_a_round_is_judged_against_its_start_and_its_best_leads"),
    Mutation(
        "a-later-finisher-of-a-round-kept-though-beaten", "aevyra_forge/loop/tuner.py",
        "        elif kept and rival is not None and",
        "        elif False and rival is not None and",
        "tests/loop/test_rounds.py::test_a_round_is_judged_against_its_start_and_its_best_leads"),
    Mutation(
        "a-gpu-judged-against-another-gpus-passes", "aevyra_forge/loop/state.py",
        "        return self.passes_on.get(worker, self.passes) if worker else self.passes\n",
        "        return self.passes\n",
        "tests/loop/test_rounds.py::"
        "test_each_gpu_judges_against_the_incumbent_as_it_measured_it"),
    Mutation(
        "builtin-proposes-a-move-already-chosen-for-the-round", "aevyra_forge/agent/*.py",
        "    seen = ctx.tried_ids | ctx.pending_ids | {ctx.best.id}\n",
        "    seen = ctx.tried_ids | {ctx.best.id}\n",
        "tests/agent/test_builtin.py::test_a_round_gets_distinct_moves_none_of_them_pending"),
    Mutation(
        "builtin-never-tries-what-it-cannot-model", "aevyra_forge/agent/builtin.py",
        "                        or (self._unmodelled_move(ctx, model) if model else None)\n",
        "",
        "tests/agent/test_engine_model.py::"
        "test_a_kernel_plugin_the_model_cannot_predict_is_tried_once_on_a_gpu_host"),
    Mutation(
        "model-trusts-a-plugin-it-simulates-as-neutral", "aevyra_forge/agent/engine_model.py",
        "        if plugin is not None and plugin.speedup is None \\\n",
        "        if False and plugin is not None and plugin.speedup is None \\\n",
        "tests/agent/test_engine_model.py::"
        "test_a_kernel_plugin_the_model_cannot_predict_is_tried_once_on_a_gpu_host"),
    Mutation(
        "builtin-ignores-the-accuracy-floor", "aevyra_forge/agent/builtin.py",
        "model.agreement(recipe) < ctx.accuracy_floor:",
        "model.agreement(recipe) < 0.99:",
        "tests/agent/test_engine_model.py::"
        "test_the_runs_accuracy_floor_and_concurrency_reach_the_model"),
    Mutation(
        "model-uncertainty-turns-a-predicted-loss-into-a-try", "aevyra_forge/agent/builtin.py",
        "        # the model misses in size, not direction: a predicted loss gets the floor's sd\n"
        "        sd = model.uncertainty(max(gain, 0.0))\n",
        "        sd = model.uncertainty(gain)\n",
        "tests/agent/test_engine_model.py::"
        "test_a_model_that_missed_does_not_turn_a_predicted_loss_into_a_try"),
    Mutation(
        "model-workload-shared-prefix-never-repeats", "aevyra_forge/agent/engine_model.py",
        '    prefix = _words("s", 0, shared, stats.ngram_repetition)',
        '    prefix = _words("s", 0, shared, 0.0)',
        "tests/agent/test_engine_model.py::"
        "test_the_models_workload_repeats_like_a_prefix_heavy_trace"),
    Mutation(
        "builtin-boots-moves-the-model-expects-below-the-floor",
        "aevyra_forge/agent/builtin.py",
        "    return model is not None and model.agreement(\n",
        "    return False and model is not None and model.agreement(\n",
        "tests/agent/test_engine_model.py::"
        "test_playbook_moves_the_model_expects_below_the_accuracy_floor_are_skipped"),
    Mutation(
        "hand-over-reason-not-shown", "aevyra_forge/loop/tuner.py",
        'why=reply.reason or "the strategy has nothing left to try"))',
        'why="the strategy has nothing left to try"))',
        "tests/loop/test_tuner.py::"
        "test_a_hand_over_shows_the_strategys_reason_and_it_sees_the_runs_floor"),
    Mutation(
        "cpu-gate-ignores-the-instruction-set", "aevyra_forge/space/quant.py",
        "        missing = sorted(serving.cpu_isa - set(hw.cpu_isa))\n",
        "        missing: list[str] = []\n",
        "tests/space/test_quant.py::test_checkpoints_served_here"),
    Mutation(
        "hub-keeps-siblings-this-host-cannot-serve", "aevyra_forge/space/hub.py",
        "    if refusal:\n        return f\"{parsed['method']} is not served here: {refusal}\"\n",
        "",
        "tests/space/test_hub.py::test_an_avx2_cpu_drops_the_4bit_sibling_with_the_reason"),
    Mutation(
        "drafts-keep-a-head-with-another-vocabulary", "aevyra_forge/space/drafts.py",
        "    if vocab != want:\n",
        "    if False:\n",
        "tests/space/test_drafts.py::"
        "test_lookup_sends_the_hubs_own_requests_and_keeps_heads_with_the_base_vocabulary"),
    Mutation(
        "drafts-keep-a-head-made-for-another-model", "aevyra_forge/space/drafts.py",
        "        if isinstance(made_for, str) and made_for.lower() != base.lower():\n",
        "        if False:\n",
        "tests/space/test_drafts.py::"
        "test_lookup_sends_the_hubs_own_requests_and_keeps_heads_with_the_base_vocabulary"),
    Mutation(
        "found-heads-never-reach-the-knob-space", "aevyra_forge/loop/quant_setup.py",
        "        space.offer_drafts(siblings.drafts.table())\n",
        "        pass\n",
        "tests/loop/test_quant_setup.py::"
        "test_heads_found_for_a_layer_one_run_reach_its_knob_space_and_its_cache"),
    Mutation(
        "a-refused-candidate-is-offered-again", "aevyra_forge/loop/tuner.py",
        "            gone = self.space.refuse_quant(recipe_from_dict(recipe), m.reason)",
        "            gone = None",
        "tests/loop/test_tuner.py::"
        "test_a_candidate_this_host_refuses_at_boot_is_not_offered_again"),
    Mutation(
        "a-cached-checkpoint-is-written-again", "aevyra_forge/engine/prepare.py",
        "        if (quant.out / MANIFEST).is_file():\n",
        "        if False:\n",
        "tests/engine/test_executor.py::"
        "test_a_prepared_checkpoint_is_reused_and_its_time_recorded"),
    Mutation(
        "boot-noise-mixes-every-gpus-boots", "aevyra_forge/decide/verdict.py",
        "             and (worker is None or r.worker == worker)]",
        "             ]",
        "tests/decide/test_verdict.py::"
        "test_between_boot_noise_is_the_candidates_own_workers"),
    Mutation(
        "a-round-overshoots-the-layer-cap", "aevyra_forge/loop/rounds.py",
        "                   self._cap_left(layer))",
        "                   len(self.workers))",
        "tests/loop/test_rounds.py::test_a_round_never_overshoots_the_layers_cap"),
    Mutation(
        "a-rounds-mates-spend-patience", "aevyra_forge/loop/state.py",
        "            return trailing - sum(1 for x in rows[len(rows) - trailing:]\n",
        "            return trailing - 0 * sum(1 for x in rows[len(rows) - trailing:]\n",
        "tests/loop/test_rounds.py::"
        "test_a_rounds_mates_of_a_gain_spend_no_patience_whatever_order_they_finish"),
    Mutation(
        "eta-counts-experiments-not-rounds", "aevyra_forge/loop/plan.py",
        "        rounds = min(math.ceil(max(0, self.max_experiments - done) / max(1, "
        "self.workers)),",
        "        rounds = min(max(0, self.max_experiments - done),",
        "tests/loop/test_plan.py::test_with_workers_the_plan_counts_rounds"),
    Mutation(
        "progress-sums-a-rounds-trials", "aevyra_forge/cli/progress.py",
        "        if record.round is None:\n            return took\n",
        "        return took\n",
        "tests/cli/test_progress.py::"
        "test_with_four_workers_a_round_counts_once_and_the_eta_in_rounds"),
    Mutation(
        "refinements-never-carried", "aevyra_forge/agent/carry.py",
        "    while len(carried) < MAX_CARRIED:\n",
        "    while False:\n",
        "tests/agent/test_carry.py::test_a_large_move_carries_what_the_model_predicts_to_add"),
    Mutation(
        "a-refinement-measured-as-a-loss-carried", "aevyra_forge/agent/carry.py",
        "               and pairable(one, observations)]\n",
        "               and True]\n",
        "tests/agent/test_carry.py::test_a_refinement_measured_as_a_loss_is_not_carried"),
    Mutation(
        "a-refinement-from-a-closed-layer", "aevyra_forge/agent/carry.py",
        "    singles = [one for one in candidates(ctx, open_layers(ctx)) if len(one) == 1\n",
        "    singles = [one for one in candidates(ctx, (1, 2, 3)) if len(one) == 1\n",
        "tests/agent/test_carry.py::"
        "test_only_open_layers_and_never_what_the_workload_makes_nil"),
    Mutation(
        "a-standing-nil-refinement-carried", "aevyra_forge/agent/carry.py",
        "               and nil(diagnosis, one) is None\n",
        "               and True\n",
        "tests/agent/test_carry.py::"
        "test_only_open_layers_and_never_what_the_workload_makes_nil"),
    Mutation(
        "a-refinement-one-experiment-confirms-carried", "aevyra_forge/agent/carry.py",
        "        own |= {name for name, (gain, _) in best.items() if gain >= ceiling}\n",
        "        own |= set()\n",
        "tests/agent/test_carry.py::"
        "test_a_refinement_one_experiment_confirms_is_a_move_of_its_own"),
    Mutation(
        "a-passenger-refinement-kept", "aevyra_forge/agent/carry.py",
        "        if adds[worst] >= MIN_MODEL_GAIN:\n",
        "        if True:\n",
        "tests/agent/test_carry.py::test_a_refinement_a_later_one_makes_pointless_is_dropped"),
    Mutation(
        "a-later-layers-move-never-joins-the-best-one", "aevyra_forge/agent/builtin.py",
        "        if added is None or added < confirmable(ctx) or top[0] < confirmable(ctx):\n",
        "        if True:\n",
        "tests/agent/test_carry.py::"
        "test_a_later_layers_large_move_opens_its_layer_to_join_the_best_one"),
    Mutation(
        "a-later-layers-small-addition-hands-over", "aevyra_forge/agent/builtin.py",
        "        if added is None or added < confirmable(ctx) or top[0] < confirmable(ctx):\n",
        "        if added is None or top[0] < confirmable(ctx):\n",
        "tests/agent/test_carry.py::"
        "test_a_later_layers_large_move_opens_its_layer_to_join_the_best_one"),
    Mutation(
        "what-vllm-requires-makes-a-move-nil", "aevyra_forge/agent/builtin.py",
        "            why = nil(diagnosis, own(ctx, changes)) or off_lever(ctx, changes)\n",
        "            why = nil(diagnosis, changes) or off_lever(ctx, changes)\n",
        "tests/agent/test_engine_model.py::"
        "test_a_smaller_token_budget_is_ranked_with_the_max_num_seqs_vllm_requires"),
    Mutation(
        "a-smaller-token-budget-left-invalid", "aevyra_forge/agent/moves.py",
        "            out += [completed(ctx, {knob.name: v}) for v in ctx.space.grid(knob)\n",
        "            out += [{knob.name: v} for v in ctx.space.grid(knob)\n",
        "tests/agent/test_moves.py::"
        "test_a_smaller_token_budget_brings_max_num_seqs_down_with_it"),
)

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider")
# Not part of a checkout: copied only when the repository is not a git work tree.
_IGNORED = ("__pycache__", ".git", ".venv*", ".mypy_cache", ".ruff_cache", ".pytest_cache",
            ".hypothesis", ".forge", "*.egg-info", "build", "dist")


class MutationError(Exception):
    """A mutation that no longer applies to the code."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    seconds: float
    first_failure: str
    output: str


def locate(root: Path, mutation: Mutation) -> Path:
    """The one file under `root` that `mutation` changes."""
    hits = [(path, path.read_text().count(mutation.old))
            for path in sorted(root.glob(mutation.where)) if path.is_file()]
    found = [(path, n) for path, n in hits if n]
    if len(found) != 1 or found[0][1] != 1:
        where = ", ".join(f"{p.relative_to(root)} ({n}x)" for p, n in found) or "nowhere"
        raise MutationError(f"{mutation.name}: expected the text exactly once in "
                            f"{mutation.where}, found it {where}:\n{mutation.old}")
    return found[0][0]


def apply(root: Path, mutation: Mutation) -> Path:
    path = locate(root, mutation)
    path.write_text(path.read_text().replace(mutation.old, mutation.new, 1))
    return path


def copy_repository(destination: Path) -> None:
    """The work tree as git sees it (tracked and untracked-but-not-ignored files), so
    virtual environments and caches stay behind; everything but those when git is
    missing. Reads the work tree only: no git command here writes anything."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, check=True, capture_output=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*_IGNORED),
                        dirs_exist_ok=True)
        return
    for name in filter(None, listing.split("\0")):
        source = ROOT / name
        if source.is_file():  # listed but deleted in the work tree: skip
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_suite(root: Path, pytest_args: Sequence[str], timeout_s: float) -> Outcome:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    where = subprocess.run([sys.executable, "-c",
                            "import aevyra_forge; print(aevyra_forge.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True)
    if not where.stdout.strip().startswith(str(root)):
        raise MutationError(f"the copy's package is not the one imported "
                            f"({where.stdout.strip() or where.stderr.strip()})")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *PYTEST, *pytest_args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Outcome(False, time.perf_counter() - start, f"timed out after {timeout_s:g} s",
                       text)
    output = done.stdout + done.stderr
    first = next((line for line in output.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))), "")
    if done.returncode != 0 and not first:
        first = f"pytest exited {done.returncode}"
    return Outcome(done.returncode == 0, time.perf_counter() - start, first, output)


def trial(snapshot: Path, mutation: Mutation | None, pytest_args: Sequence[str],
          timeout_s: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        root = Path(tmp).resolve() / "repo"
        shutil.copytree(snapshot, root)
        if mutation is not None:
            apply(root, mutation)
        return run_suite(root, pytest_args, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        choices=[m.name for m in MUTATIONS], help="run only this mutation")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds one suite run may take (default 1800)")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="mutation-snapshot-") as tmp:
        snapshot = Path(tmp).resolve() / "repo"
        copy_repository(snapshot)
        return check(snapshot, chosen, args.pytest_args, args.timeout)


def check(snapshot: Path, chosen: Sequence[Mutation], pytest_args: Sequence[str],
          timeout_s: float) -> int:
    try:
        for mutation in chosen:  # fail before any suite run when the table is stale
            locate(snapshot, mutation)
        control = trial(snapshot, None, pytest_args, timeout_s)
    except MutationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = max(len(m.name) for m in MUTATIONS)
    print(f"{'control (no mutation)':<{width}}  {'passed' if control.passed else 'FAILED':<8}"
          f" {control.seconds:6.1f} s  {control.first_failure}", flush=True)
    if not control.passed:
        print("the suite fails without any mutation, so a mutation run says nothing:\n"
              + "\n".join(control.output.splitlines()[-30:]), file=sys.stderr)
        return 2
    survived = []
    for mutation in chosen:
        try:
            outcome = trial(snapshot, mutation, pytest_args, timeout_s)
        except MutationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        verdict = "SURVIVED" if outcome.passed else "caught"
        detail = (f"meant to be caught by {mutation.caught_by}" if outcome.passed
                  else outcome.first_failure)
        print(f"{mutation.name:<{width}}  {verdict:<8} {outcome.seconds:6.1f} s  {detail}",
              flush=True)
        if outcome.passed:
            survived.append(mutation.name)
    if survived:
        print(f"{len(survived)} of {len(chosen)} mutations survived: {', '.join(survived)}",
              file=sys.stderr)
        return 1
    print(f"all {len(chosen)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
