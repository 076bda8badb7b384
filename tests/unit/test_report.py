from advisor.report import write_report
from tests.factories import make_profile


def test_report_writes_a_png_and_a_page_naming_the_knee(tmp_path):
    profile = make_profile()
    png, page = write_report(profile, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = page.read_text()
    assert f"B* = {profile.b_star}" in text and "profile.png" in text
    assert text.count("<tr>") == len(profile.points) + 1


def test_plateau_report_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    from deployments import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    profile = tmp_path / "profile.json"
    profile.write_text(make_profile().model_dump_json())
    assert cli.main(["report", str(profile), "--out", str(tmp_path / "out")]) != 0
    assert "pip install 'plateau-serve[report]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
