"""nanotrain.plot draws one or two runs' metrics.jsonl into a PNG, and refuses bad input in one line."""

import json

import pytest

from nanotrain.plot import main

pytest.importorskip("matplotlib")


def write_run(run_dir, steps=10, torn_last_line=False):
    run_dir.mkdir()
    lines = [json.dumps({"step": s, "loss": 5 - 0.3 * s, "lr": 1e-3 * s, "tokens_per_sec": 1000 + s})
             for s in range(1, steps + 1)]
    lines.append(json.dumps({"step": steps, "val_loss": 2.5}))
    text = "\n".join(lines) + "\n" + ('{"step": 11, "lo' if torn_last_line else "")
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_two_runs_make_one_png(tmp_path, capsys):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", steps=6, torn_last_line=True)
    out = tmp_path / "plots" / "compare.png"
    main([str(a), str(b), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert not list(out.parent.glob("*.partial"))
    main([str(a)])  # default output inside the run
    assert (a / "curves.png").is_file()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "metrics.jsonl not found"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "holds no loss records"),
    (lambda d: (d.mkdir(),
                (d / "metrics.jsonl").write_text('oops\n{"step": 1, "loss": 1, "lr": 1, "tokens_per_sec": 1}\n')),
     "line 1 is not JSON"),
])
def test_bad_run_directories_give_one_line_errors(tmp_path, capsys, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
