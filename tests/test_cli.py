"""plumbing/cli.py: one meaning per flag, mistakes in one line, Ctrl-C as a shell reports it."""

import pytest

from plumbing import cli

from tools import run_main


@pytest.mark.parametrize("tool, argv",
                         [("caption.py", ["x"]), ("label.py", ["x"]),
                          ("judge.py", ["--gt", "a", "--pred", "b", "--out", "c"]),
                          ("train.py", ["--data", "d", "--out", "o", "--model", "m"])])
def test_an_abbreviated_flag_is_refused_and_a_near_miss_names_the_flag_meant(tool, argv):
    flag = "--save-minutes" if tool == "train.py" else "--max-failures-in-a-row"
    # cut short; two letters swapped
    for typed in (flag[:-1], flag[:-3] + flag[-2] + flag[-3] + flag[-1]):
        r = run_main(tool, [*argv, typed, "3"])
        said = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and said.startswith("error: unrecognized arguments"), said
        assert f"did you mean {flag}?" in said, said


def test_ctrl_c_exits_130_with_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
