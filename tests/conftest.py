"""Fixtures shared by the test files."""

import os

import pytest
import torch

from helpers import tiny_checkpoint
from tools import kill_started

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))   # pytest -n N
if WORKERS > 1:   # the cores shared among the workers and the tools they start, not each taking all
    THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


# Slow: what the whole suite measured at 5 s or more (pytest --durations, two workers, this 2-core
# machine), and the rehearsals at real sizes. `pytest -m "not slow"` leaves them out: the inner loop.
SLOW = {
    "test_bench.py": (
        "test_the_tiny_size_runs_and_records_what_it_depends_on",
    ),
    "test_caption.py": (
        "test_a_folder_with_no_videos_or_only_broken_ones_exits_1_in_one_line",
        "test_a_model_folder_carries_its_prompt",
        "test_a_rerun_with_other_settings_refuses_the_file_and_overwrite_redoes_it",
        "test_folder_with_good_and_broken_videos",
        "test_killed_mid_run_then_rerun_gives_every_video_once",
        "test_retry_errors_leaves_one_row_and_spellings_and_a_second_run_are_refused",
        "test_torchrun_ranks_share_the_work_and_merge",
    ),
    "test_chaos.py": (
        "test_label_chaos_kill_and_rerun",
    ),
    "test_events.py": (
        "test_label_verify_keeps_the_sentences_the_frames_support",
        "test_label_verify_shards_survive_faults_and_use_the_labels_frames",
    ),
    "test_files.py": (
        "test_a_file_name_that_is_not_utf8",
        "test_a_full_disk_ends_the_run_with_one_line_and_loses_no_finished_row",
        "test_one_video_spelled_three_ways_is_one_row_and_retry_errors_leaves_one_row",
        "test_resume_and_shards_do_not_depend_on_how_or_where_the_folder_is_named",
        "test_two_label_runs_on_one_output",
        "test_unreadable_files_do_not_stop_a_run_and_missing_ones_are_not_done",
    ),
    "test_generate.py": (
        "test_static_cache_path_and_compiled_step_equal_the_plain_path",
    ),
    "test_hardening.py": (
        "test_10_rank_files_belong_to_the_run_that_made_them",
        "test_3_chaos_a_stalled_decoder_is_retried_by_the_next_run_not_final",
        "test_4_a_long_decode_that_moves_on_is_not_cut_by_the_time_limit",
        "test_8_new_weights_in_the_same_folder_do_not_keep_the_old_captions",
        "test_9_label_refuses_an_out_made_with_other_settings",
    ),
    "test_hub.py": (
        "test_four_processes_resolving_one_model_download_it_once",
    ),
    "test_label.py": (
        "test_fault_mix_every_video_one_row",
        "test_rate_cap_and_concurrency",
        "test_sigkill_then_rerun_every_video_exactly_once",
    ),
    "test_network.py": (
        "test_a_refused_key_or_no_quota_stops_the_run_and_marks_nothing_done",
        "test_ctrl_c_writes_the_answers_in_flight_and_a_second_abandons_them",
    ),
    "test_newcomer.py": (
        "test_a_failed_start_leaves_nothing_behind",
        "test_a_model_is_named_one_way_everywhere",
        "test_the_quickstart_runs_as_written_against_a_local_teacher",
    ),
    "test_quant.py": (
        "test_a_dry_run_plans_13b_and_34b_on_a_card_before_loading_anything",
    ),
    "test_recheck.py": (
        "test_recheck_asks_again_only_where_the_student_disagrees_most",
        "test_recheck_killed_then_rerun_asks_only_what_was_not_done",
        "test_recheck_shards_survive_faults_and_choose_as_one_run",
    ),
    "test_rehearse.py": (
        "test_a_steady_decode_step_at_13b_reads_nothing_back_and_is_bound_by_its_bytes",
        "test_the_plan_is_within_10_percent_of_the_rehearsal_and_13b_fits_80_gb_at_16_slots",
    ),
    "test_shots.py": (
        "test_caption_and_label_per_window_and_label_per_shot",
        "test_caption_per_shot_with_times_and_a_killed_run_redoes_no_shot",
    ),
    "test_toy.py": (
        "test_quick_loop_learns",
    ),
    "test_train.py": (
        "test_a_dry_run_plans_the_memory_of_each_gpu_before_anything_loads",
        "test_a_rerun_into_a_finished_out_refuses_at_once_and_resume_of_nothing_says_so",
        "test_broken_rows_are_reported_with_file_and_line_and_left_out",
        "test_export_captions_and_loads_in_peft",
        "test_loss_falls_on_a_tiny_set",
        "test_sigkill_then_resume_equals_uninterrupted",
        "test_two_ranks_resume_from_an_older_checkpoint",
        "test_two_ranks_train_the_same_weights_as_one_process",
    ),
    "test_train_hazards.py": (
        "test_a_resume_keeps_its_schedule_and_a_new_length_is_refused",
        "test_a_stalled_decoder_is_that_sample_skipped_with_its_path_and_training_goes_on",
        "test_training_from_an_exported_model_keeps_its_prompt",
    ),
}


def pytest_collection_modifyitems(items):
    for item in items:
        if getattr(item, "originalname", item.name) in SLOW.get(os.path.basename(str(item.fspath)), ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny random PLLaVA checkpoint folder, as a release ships it (config, safetensors, tokenizer)."""
    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), seed=1)


@pytest.fixture(autouse=True)
def no_orphans():
    """A test that started a tool and failed before ending it leaves no process behind (CI's cores)."""
    yield
    kill_started()


@pytest.fixture
def no_grad():
    """Inference only, for the files that say `pytestmark = pytest.mark.usefixtures("no_grad")`."""
    with torch.no_grad():
        yield


def tiny_model(tmp_path_factory, seed):
    """(model, tokenizer, folder) of a tiny random checkpoint saved with this seed: for a module fixture."""
    from model import PLLaVA
    from tokenizer import Tokenizer
    folder = tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), seed=seed)
    return PLLaVA.from_pretrained(folder), Tokenizer(folder), folder
