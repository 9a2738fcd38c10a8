"""plumbing/sources.py: one name per video whatever the mount, and files paired by what they are."""

import json
import os

from plumbing import sources
from plumbing.sources import find_videos, in_shard, paired

from videos import write_video


def test_a_folder_gives_the_same_names_through_any_mount_and_shards_split_them_once(tmp_path):
    (tmp_path / "share" / "season1").mkdir(parents=True)
    for name in ("a.mp4", "season1/b.mkv", "season1/c.mp4"):
        (tmp_path / "share" / name).write_bytes(b"x")
    os.symlink(tmp_path / "share", tmp_path / "mnt")
    direct, linked = (
        find_videos(str(tmp_path / "share")),
        find_videos(str(tmp_path / "mnt") + "/./"),
    )
    assert ([v.name for v in direct] == [v.name for v in linked] == ["a.mp4", "season1/b.mkv",
                                                                     "season1/c.mp4"])
    # paths differ, names do not
    assert [str(v) for v in direct] != [str(v) for v in linked]
    assert sorted(v.name for k in range(3) for v in direct if in_shard(v.name, (k, 3))) == \
        sorted(v.name for v in direct)


def test_a_video_listed_twice_through_a_symlink_is_one_video_on_every_mount(tmp_path):
    (tmp_path / "share" / "videos").mkdir(parents=True)
    (tmp_path / "share" / "videos" / "v.mp4").write_bytes(b"x")
    (tmp_path / "share" / "dup.txt").write_text(f"videos/v.mp4\n{tmp_path}/share/videos/v.mp4\n")
    os.symlink(tmp_path / "share", tmp_path / "mnt")
    for listing in (tmp_path / "share" / "dup.txt", tmp_path / "mnt" / "dup.txt"):
        assert len(find_videos(str(listing))) == 1, listing


def test_two_files_pair_the_same_file_through_links_and_never_two_files_of_one_name(tmp_path):
    (tmp_path / "share" / "test").mkdir(parents=True)
    for name in ("a.mp4", "test/a.mp4"):
        (tmp_path / "share" / name).write_bytes(name.encode())
    os.symlink(tmp_path / "share", tmp_path / "mnt")
    gt = {("a.mp4", None): str(tmp_path / "share/a.mp4"),
          ("test/a.mp4", None): str(tmp_path / "share/test/a.mp4")}
    # made from share/test: another a.mp4
    pred = {("a.mp4", None): str(tmp_path / "mnt/test/a.mp4")}
    assert paired(gt, pred) == {("test/a.mp4", None): ("a.mp4", None)}
    # not here: the name decides
    elsewhere = {("a.mp4", None): "/on/another/node/a.mp4"}
    assert paired(gt, elsewhere) == {("a.mp4", None): ("a.mp4", None)}


def test_symlinked_folders_are_followed_once_and_lists_may_hold_u2028(tmp_path):
    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    write_video(str(real / "deep" / "a.mp4"), n_frames=4)
    top = tmp_path / "top"
    top.mkdir()
    os.symlink(real, top / "linked")
    os.symlink(top, top / "linked2" if False else real / "loop")   # a link back up: a loop
    found = sources.find_videos(str(top))
    assert [os.path.basename(v) for v in found] == ["a.mp4"]
    listing = tmp_path / "list.jsonl"
    video = write_video(str(tmp_path / "b.mp4"), n_frames=4)
    listing.write_text(json.dumps({"video": video, "caption": "a line\u2028separator"},
                                  ensure_ascii=False) + "\n")
    assert sources.find_videos(str(listing)) == [video]
