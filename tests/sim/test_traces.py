"""Trace readers and cluster specs (coordinator/sim/traces.py): each format on small files,
gzip, rebasing, bad rows refused with their line numbers (or skipped and counted)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from coordinator.sim.engine import NodeGroup, SimJob
from coordinator.sim.traces import (
    MAX_GPUS_PER_NODE,
    ClusterError,
    TraceError,
    detect_format,
    format_cluster,
    parse_cluster,
    read_trace,
)

ROOT = Path(__file__).resolve().parents[2]
PHILLY = ROOT / "tests" / "fixtures" / "traces" / "philly.csv.gz"

PHILLY_CSV = """timestamp,duration,num_gpus,gpu_time,cluster
2017-10-09 07:01:55,66.0,1,66.0,11cb48
2017-10-09 06:13:03,2951.0,4,11804.0,6214e9

2017-10-09 06:13:36,2759.0,1,2759.0,6214e9
"""

HELIOS_CSV = (
    "job_id,user,vc,gpu_num,cpu_num,node_num,state,submit_time,start_time,end_time,duration,"
    "queue\n"
    "1425511,uXBbc,vcJkd,1,1,1,COMPLETED,2020-06-09 18:41:01,2020-06-09 18:41:01,"
    "2020-06-10 04:55:09,36848,0\n"
    "1425512,uVMrF,vchbv,16,16,2,FAILED,2020-06-09 18:41:27,2020-06-09 18:41:30,"
    "2020-06-09 18:45:36,246,3\n"
    "1425513,uzqls,vcpDC,0,1,1,COMPLETED,2020-06-09 18:41:28,2020-06-09 18:41:28,"
    "2020-06-17 14:15:21,675233,0\n"
)

PLAIN_CSV = """tenant,gpus,duration_s,submit_time,priority,nodes,gpu_type
acme,2,100,50,7,1,V100
beta,1,10.5,20,,,
acme,8,5,20,3,2,
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_philly_rows_become_jobs_rebased_in_submit_order(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "p.csv", PHILLY_CSV))
    assert trace.format == "philly"
    assert trace.jobs == [
        SimJob("3", 0.0, 2951.0, 4, "6214e9"),  # ids: the line in the file
        SimJob("5", 33.0, 2759.0, 1, "6214e9"),  # line 4 is blank: not a row
        SimJob("2", 2932.0, 66.0, 1, "11cb48"),
    ]
    assert trace.skipped == 0 and trace.origin == 1507529583.0  # 2017-10-09 06:13:03 UTC


def test_helios_rows_leave_cpu_jobs_out_and_keep_nodes(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "cluster_log.csv", HELIOS_CSV))
    assert trace.format == "helios"
    assert trace.jobs == [
        SimJob("1425511", 0.0, 36848.0, 1, "vcJkd"),
        SimJob("1425512", 26.0, 246.0, 16, "vchbv", nodes=2),
    ]
    assert trace.cpu_only == 1


def test_plain_rows_with_optional_columns_in_any_order(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "plain.csv", PLAIN_CSV))
    assert trace.format == "plain"
    assert trace.jobs == [
        SimJob("3", 0.0, 10.5, 1, "beta"),  # ties keep file order
        SimJob("4", 0.0, 5.0, 8, "acme", priority=3, nodes=2),
        SimJob("2", 30.0, 100.0, 2, "acme", priority=7, gpu_type="V100"),
    ]


def test_plain_submit_times_may_be_dates(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "submit_time,duration_s,gpus,tenant,id\n"
                 "2024-01-01T00:01:00+00:00,5,1,a,x\n2024-01-01 00:00:00,5,1,b,y\n")
    assert [(j.id, j.submit_s) for j in read_trace(path).jobs] == [("y", 0.0), ("x", 60.0)]


def test_gzip_by_name_and_by_magic(tmp_path: Path) -> None:
    packed = gzip.compress(PHILLY_CSV.encode())
    (tmp_path / "p.csv.gz").write_bytes(packed)
    (tmp_path / "p.bin").write_bytes(packed)
    plain = read_trace(write(tmp_path, "p.csv", PHILLY_CSV)).jobs
    assert read_trace(tmp_path / "p.csv.gz").jobs == plain
    assert read_trace(tmp_path / "p.bin").jobs == plain


def test_limit_keeps_the_first_jobs_in_submit_order(tmp_path: Path) -> None:
    jobs = read_trace(write(tmp_path, "p.csv", PHILLY_CSV), limit=2).jobs
    assert [j.id for j in jobs] == ["3", "5"]


BAD_PLAIN = """submit_time,duration_s,gpus,tenant,priority
0,10,1,a,5
1,-4,1,a,5
2,10,0,a,5
3,10,1.5,a,5
4,10,1,,5
5,10,1,a,11
six,10,1,a,5
7,nan,1,a,5
8,10,1,a
9,10,1,a,5
"""


def test_bad_rows_are_refused_with_line_numbers_and_reasons(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as caught:
        read_trace(write(tmp_path, "bad.csv", BAD_PLAIN))
    err = caught.value
    assert [(b.line, b.reason) for b in err.bad] == [
        (3, "duration_s -4 is not in 0..315360000 seconds"),
        (4, "gpus '0' is not a whole number in 1..4096"),
        (5, "gpus '1.5' is not a whole number in 1..4096"),
        (6, "tenant is empty"),
        (7, "priority '11' is not a whole number in 0..10"),
        (8, "submit_time 'six' is neither seconds nor a date (YYYY-MM-DD HH:MM:SS)"),
        (9, "duration_s 'nan' is not a finite number"),
        (10, "4 fields, the header has 5"),
    ]
    assert "8 bad row(s)" in str(err) and "line 3: duration_s -4" in str(err)


def test_bad_rows_skipped_and_counted_when_asked(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "bad.csv", BAD_PLAIN), skip_bad=True)
    assert [j.id for j in trace.jobs] == ["2", "11"]
    assert trace.skipped == 8 and trace.samples[0].line == 3


@pytest.mark.parametrize(("text", "reason"), [
    ("", "the file is empty"),
    ("a,b,c\n1,2,3\n", "is none of the known formats"),
    ("submit_time,duration_s,gpus\n0,1,1\n", "is none of the known formats"),
])
def test_files_that_are_no_trace_are_refused(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(TraceError, match=reason):
        read_trace(write(tmp_path, "x.csv", text))


def test_unreadable_files_are_refused_not_raised_raw(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot open"):
        read_trace(tmp_path / "absent.csv")
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(TraceError, match="unreadable"):
        read_trace(tmp_path / "broken.gz")
    (tmp_path / "latin.csv").write_bytes(b"submit_time,duration_s,gpus,tenant\n0,1,1,caf\xe9\n")
    with pytest.raises(TraceError, match="unreadable"):
        read_trace(tmp_path / "latin.csv")


def test_detect_format_by_header() -> None:
    assert detect_format(["Timestamp", "duration", "num_gpus", "gpu_time", "cluster"]) == "philly"
    assert detect_format(["submit_time", "duration_s", "gpus", "tenant"]) == "plain"


def test_the_philly_trace_in_the_repo_reads_whole() -> None:
    trace = read_trace(PHILLY)
    assert trace.format == "philly" and len(trace.jobs) == 82_247 and trace.skipped == 0
    assert trace.jobs[0].submit_s == 0.0
    assert all(a.submit_s <= b.submit_s for a, b in zip(trace.jobs, trace.jobs[1:], strict=False))
    assert len({j.tenant for j in trace.jobs}) == 15
    assert sum(j.gpus == 1 for j in trace.jobs) == 76_627


def test_cluster_specs_parse() -> None:
    assert parse_cluster("8x8:V100,4x4:T4") == [NodeGroup(8, 8, "V100"), NodeGroup(4, 4, "T4")]
    assert parse_cluster(" 2 X 4 , 1x1:rtx-4090 ") == [NodeGroup(2, 4, ""),
                                                        NodeGroup(1, 1, "rtx-4090")]
    assert format_cluster(parse_cluster("8x8:V100,16x4")) == "8x8:V100,16x4"


@pytest.mark.parametrize(("spec", "reason"), [
    ("", "the cluster is empty"),
    ("8x", "group 1 '8x' is not NODESxGPUS"),
    ("8x8:V100,4*4", "group 2 '4\\*4' is not NODESxGPUS"),
    ("8x8:V 100", "is not NODESxGPUS"),
    ("0x8", "nodes must be 1..100000"),
    (f"1x{MAX_GPUS_PER_NODE + 1}", "GPUs per node must be 1..64"),
    ("8x0:T4", "GPUs per node must be 1..64"),
    ("60000x8,60000x8", "more than 100,000 nodes"),
])
def test_bad_cluster_specs_say_why(spec: str, reason: str) -> None:
    with pytest.raises(ClusterError, match=reason):
        parse_cluster(spec)
