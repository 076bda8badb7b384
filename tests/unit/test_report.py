from advisor.report import write_report
from tests.factories import make_profile


def test_report_writes_a_png_and_a_page_naming_the_knee(tmp_path):
    profile = make_profile()
    png, page = write_report(profile, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = page.read_text()
    assert f"B* = {profile.b_star}" in text and "profile.png" in text
    assert text.count("<tr>") == len(profile.points) + 1
