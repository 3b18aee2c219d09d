"""The local PACS without starting it: Orthanc's configuration, where the stack finds and how
it installs Orthanc, the synthetic DICOM instances and the DICOMweb message framing."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.uid import UID

from medmesh_cli.devstack import orthanc as orthanc_module
from medmesh_cli.devstack import studies
from medmesh_cli.devstack.orthanc import (
    OrthancConfig,
    OrthancMissingError,
    ensure_orthanc,
    render_config,
)
from medmesh_cli.devstack.stack import StackConfig, StackPorts, stack_ports
from medmesh_cli.devstack.studies import StudyIdentity, build_radiograph
from medmesh_runtime import dicomweb


def test_config_serves_dicomweb_on_the_stack_port_from_its_state_folder(tmp_path: Path) -> None:
    """The configuration: HTTP on the given port, storage and index under the state folder,
    the DICOMweb plugin loaded and enabled under /dicom-web/."""
    config = OrthancConfig(state_dir=tmp_path / "orthanc", http_port=19042)
    plugin = Path("/opt/orthanc/libOrthancDicomWeb.so")
    rendered = render_config(config, plugin)
    assert rendered["HttpPort"] == 19042
    assert rendered["StorageDirectory"] == str(tmp_path / "orthanc" / "storage")
    assert rendered["IndexDirectory"] == rendered["StorageDirectory"]
    assert rendered["Plugins"] == [str(plugin)]
    assert rendered["DicomWeb"]["Enable"] is True
    assert rendered["DicomWeb"]["Root"] == "/dicom-web/"
    assert config.dicomweb_url == "http://127.0.0.1:19042/dicom-web"


def test_config_refuses_remote_clients_and_opens_no_dimse_listener(tmp_path: Path) -> None:
    """Loopback only: remote HTTP refused, no DICOM (DIMSE) server, no Lua, WebDAV or peers."""
    rendered = render_config(OrthancConfig(state_dir=tmp_path), Path("/p.so"))
    assert rendered["RemoteAccessAllowed"] is False
    assert rendered["DicomServerEnabled"] is False
    assert rendered["AuthenticationEnabled"] is False
    assert rendered["WebDavEnabled"] is False
    assert rendered["ExecuteLuaEnabled"] is False
    assert rendered["LuaScripts"] == []
    assert rendered["DicomModalities"] == {}
    assert rendered["OrthancPeers"] == {}
    assert rendered["DeidentifyLogs"] is True


def test_stack_ports_give_orthanc_its_own_port_from_the_base(tmp_path: Path) -> None:
    """From a base, Orthanc's HTTP port is base + 42, distinct from every other fixed port."""
    ports = StackPorts.from_base(35000)
    assert ports.orthanc_http == 35042
    fixed = [getattr(ports, f.name) for f in dataclasses.fields(ports)]
    assert len(fixed) == len(set(fixed))
    assert ports.orthanc_http in stack_ports(ports)
    default = StackPorts()
    # The orthanc package's own service, where it runs, listens on 8042.
    assert default.orthanc_http != 8042
    config = StackConfig(ports=ports, state_dir=tmp_path)
    assert config.dicomweb_url == "http://127.0.0.1:35042/dicom-web"
    assert config.orthanc.state_dir == tmp_path / "orthanc"


def test_binary_override_that_is_not_a_file_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A MEDMESH_ORTHANC_BINARY that names nothing fails with the apt-get line to run."""
    monkeypatch.setenv(orthanc_module.BINARY_VARIABLE, str(tmp_path / "missing"))
    with pytest.raises(OrthancMissingError) as caught:
        orthanc_module.orthanc_binary()
    assert "apt-get install -y --no-install-recommends orthanc orthanc-dicomweb" in str(
        caught.value
    )


def test_ensure_without_root_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Orthanc missing and not root: nothing is run, the error says how to get Orthanc."""
    monkeypatch.setattr(orthanc_module, "find_orthanc", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ran: list[Sequence[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda command, **_: ran.append(command))
    with pytest.raises(OrthancMissingError, match="orthanc-dicomweb"):
        ensure_orthanc()
    assert ran == []


def test_ensure_as_root_installs_both_packages_without_recommends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Orthanc missing and root with apt-get: apt-get install, non-interactive, no
    recommends, both packages; the paths found afterwards are returned."""
    installed: list[bool] = []
    found = (Path("/usr/sbin/Orthanc"), Path("/usr/share/orthanc/plugins/p.so"))
    monkeypatch.setattr(orthanc_module, "find_orthanc", lambda: found if installed else None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(
        command: list[str], env: dict[str, str], **_: Any
    ) -> subprocess.CompletedProcess[str]:
        calls.append((command, env))
        installed.append(True)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert ensure_orthanc() == found
    [(command, env)] = calls
    assert command == [
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "orthanc",
        "orthanc-dicomweb",
    ]
    assert env["DEBIAN_FRONTEND"] == "noninteractive"


def test_ensure_as_root_reports_apt_get_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """apt-get failing twice (the second time after apt-get update) is an error with its
    output and the install hint, never a silent pass."""
    monkeypatch.setattr(orthanc_module, "find_orthanc", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    commands: list[list[str]] = []

    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(OrthancMissingError, match="Unable to locate package"):
        ensure_orthanc()
    assert [c[1] for c in commands] == ["install", "update", "install"]


def radiograph(seed: int = 3) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """A 256x256 12-bit test image with every corner distinct."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, studies.MAX_PIXEL + 1, size=(256, 256), dtype=np.uint16)


@pytest.fixture
def strict_writing() -> Iterator[None]:
    """pydicom raises on any value its VR does not allow while the test writes."""
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = previous


@pytest.mark.usefixtures("strict_writing")
def test_radiograph_is_a_valid_dx_instance_with_the_given_pixels() -> None:
    """The built instance writes as Part 10 under strict VR checks and reads back as a DX
    For Presentation chest image, MONOCHROME2 16/12/11, with exactly the pixels given."""
    pixels = radiograph()
    identity = StudyIdentity.new()
    data = studies.to_bytes(build_radiograph(pixels, identity))
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == studies.DX_FOR_PRESENTATION
    assert ds.file_meta.MediaStorageSOPInstanceUID == identity.sop_uid
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
        identity.study_uid,
        identity.series_uid,
        identity.sop_uid,
    )
    assert ds.Modality == "DX"
    assert ds.BodyPartExamined == "CHEST"
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (ds.Rows, ds.Columns) == (256, 256)
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_radiograph_patient_is_visibly_synthetic() -> None:
    """The patient is SYNTHETIC^PATIENT with a MEDMESH-SYNTH- id, no birth date, no accession."""
    ds = build_radiograph(radiograph(), StudyIdentity.new())
    assert str(ds.PatientName) == "SYNTHETIC^PATIENT"
    assert ds.PatientID.startswith(studies.SYNTHETIC_PREFIX)
    assert ds.PatientBirthDate == ""
    assert ds.AccessionNumber == ""
    assert ds.PatientIdentityRemoved == "YES"


@pytest.mark.parametrize(
    ("pixels", "problem"),
    [
        (np.full((8, 8), 4096, dtype=np.uint16), "12 stored bits"),
        (np.zeros((8, 8), dtype=np.int32), "uint16"),
        (np.zeros((2, 8, 8), dtype=np.uint16), "2 dimensions"),
    ],
)
def test_radiograph_refuses_pixels_that_do_not_fit(
    pixels: np.ndarray[Any, Any], problem: str
) -> None:
    """Pixels above 4095, not uint16, or not 2-D are refused, not truncated."""
    with pytest.raises(ValueError, match=problem):
        build_radiograph(pixels, StudyIdentity.new())


def test_radiograph_refuses_a_description_too_long_for_its_vr() -> None:
    """A study description over 64 characters (VR LO) is refused."""
    with pytest.raises(ValueError, match="64"):
        build_radiograph(radiograph(), StudyIdentity.new(), description="x" * 65)


def test_identities_are_valid_uids_fixed_by_seed() -> None:
    """UIDs are valid 2.25 UIDs; the same seed gives the same study, another seed or none
    gives new ones."""
    first, again, other = (StudyIdentity.new("a"), StudyIdentity.new("a"), StudyIdentity.new("b"))
    assert first == again
    assert first.study_uid != other.study_uid
    assert StudyIdentity.new() != StudyIdentity.new()
    uids = (first.study_uid, first.series_uid, first.sop_uid)
    assert len(set(uids)) == 3
    for uid in uids:
        assert UID(uid).is_valid
        assert uid.startswith("2.25.")


def test_multipart_framing_round_trips_binary_parts() -> None:
    """multipart_parts reads back exactly the parts multipart_related framed, CRLFs and
    dashes inside a part included."""
    parts = [
        b"\r\n--not-a-boundary\r\n\x00\xff",
        b"",
        studies.to_bytes(build_radiograph(radiograph(), StudyIdentity.new())),
    ]
    body, content_type = dicomweb.multipart_related(parts, "application/dicom")
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    assert dicomweb.multipart_parts(body, content_type) == parts


def test_multipart_parts_refuses_a_non_multipart_answer() -> None:
    """An answer without a boundary is an error, not zero parts."""
    with pytest.raises(ValueError, match="not a multipart"):
        dicomweb.multipart_parts(b"{}", "application/json")


def _stow_answer(stored: Sequence[str], failed: Sequence[str]) -> dict[str, Any]:
    def items(uids: Sequence[str]) -> dict[str, Any]:
        return {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}

    answer: dict[str, Any] = {}
    if stored:
        answer[studies.TAG_REFERENCED_SOPS] = items(stored)
    if failed:
        answer[studies.TAG_FAILED_SOPS] = items(failed)
    return answer


def test_stow_posts_multipart_dicom_and_checks_every_instance_was_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """STOW-RS posts one application/dicom part per instance; an answer that stored them all
    is returned, one with a failed instance raises StowError naming counts only."""
    datasets = [build_radiograph(radiograph(s), StudyIdentity.new()) for s in (1, 2)]
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    answers = iter([_stow_answer(sops, []), _stow_answer(sops[:1], sops[1:])])
    seen: list[tuple[str, bytes, dict[str, str]]] = []

    def fake_post(url: str, content: bytes, headers: dict[str, str], **_: Any) -> httpx.Response:
        seen.append((url, content, headers))
        return httpx.Response(200, json=next(answers))

    monkeypatch.setattr(httpx, "post", fake_post)
    result = studies.stow("http://pacs/dicom-web", datasets)
    assert result.stored == tuple(sops)
    url, content, headers = seen[0]
    assert url == "http://pacs/dicom-web/studies"
    parts = dicomweb.multipart_parts(content, headers["Content-Type"])
    assert [pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID for p in parts] == sops
    with pytest.raises(studies.StowError, match="1 of 2 instances stored, 1 failed") as caught:
        studies.stow("http://pacs/dicom-web", datasets)
    assert "SYNTHETIC" not in str(caught.value)
