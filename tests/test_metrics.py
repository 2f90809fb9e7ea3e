"""Prometheus metrics (``--metrics HOST:PORT``): a real Prometheus server scrapes a running
``pvcore serve`` while real NBD clients (nbdcopy, qemu-io) use its lpar block device; the
families the collector builds from the engines' own counters; the errors a user can make."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pvcore.contract import DeviceConfig
from pvcore.devices.block.iopool import default_max_threads
from pvcore.devices.net.switch import Port, Switch
from pvcore.devices.net.virtio_net import NetEndpoint
from pvcore.metrics import DeviceCollector, MetricsAddress, ServedEntry
from pvcore.service_time import ServiceTimeHistogram

NBD_CLIENTS = ("nbdcopy", "qemu-io")
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true; generous timeouts (the machine is shared)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def start_serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "serve.log"
    env = dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "serve", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    wait_for(lambda: " device(s); default hypervisor " in log.read_text() or proc.poll() is not None, 60, "pvcore serve to start")
    assert proc.poll() is None, log.read_text()
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prometheus_query(port: int, query: str) -> dict[str, float]:
    """The instant vector of ``query`` on the Prometheus server at ``port``: value by its ``op`` label."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
    except OSError:
        return {}
    return {sample["metric"].get("op", ""): float(sample["value"][1]) for sample in answer["data"]["result"]}


def test_prometheus_scrapes_the_counts_of_what_nbd_clients_did(tmp_path: Path) -> None:
    for tool in ("prometheus", *NBD_CLIENTS):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/ensure-debian-packages"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MIB))
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(4 * MIB))
    sock = tmp_path / "vm1-disk.sock"
    metrics_port, prometheus_port = free_port(), free_port()
    serve, log = start_serve(
        tmp_path, "--hypervisor", "lpar", "--metrics", f"127.0.0.1:{metrics_port}", f"block:path={image},socket={sock}"
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: pvcore\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    try:
        uri = f"nbd+unix:///?socket={sock}"
        subprocess.run(["nbdcopy", str(source), uri], check=True, timeout=120)
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "read 0 4k", "-c", "read 4k 4k", "-c", "read 8k 4k", "-c", "flush", uri],
            check=True, timeout=120, capture_output=True,
        )
        selector = '{job="pvcore",device="vm1-disk",domain="vm1",class="block",hypervisor="lpar"}'

        def scraped():
            requests = prometheus_query(prometheus_port, f"pvcore_requests_total{selector}")
            return requests if requests.get("read") == 3 else None

        requests = wait_for(scraped, 180, "Prometheus to scrape the three reads qemu-io made")
        moved = prometheus_query(prometheus_port, f"pvcore_request_bytes_total{selector}")
        assert moved == {"read": 3 * 4096, "write": 4 * MIB}
        assert requests["write"] >= 1 and requests["flush"] >= 1 and requests["discard"] == 0
        served_times = prometheus_query(prometheus_port, f"pvcore_request_seconds_count{selector}")
        assert served_times[""] == sum(requests.values())
        assert prometheus_query(prometheus_port, f"pvcore_inflight_requests{selector}") == {"": 0}
        assert prometheus_query(prometheus_port, f'pvcore_errors_total{selector}') == {"": 0}
        pool = {name: prometheus_query(prometheus_port, f'pvcore_io_pool_{name}{{job="pvcore"}}')[""]
                for name in ("max_threads", "turns_total", "stall_threads_total")}
        assert pool == {"max_threads": default_max_threads(), "turns_total": pool["turns_total"], "stall_threads_total": 0}
        assert pool["turns_total"] >= 4 * MIB // (256 * 1024)  # nbdcopy's 256 KiB writes went to the I/O threads
    finally:
        prometheus.send_signal(signal.SIGTERM)
        prometheus.wait(60)
        stop(serve)
    assert serve.returncode == 0, log.read_text()


def test_a_metrics_port_in_use_is_one_error_and_no_device_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = tmp_path / "vm1-disk.sock"
        (tmp_path / "disk.img").write_bytes(bytes(MIB))
        done = subprocess.run(
            [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", "--metrics", f"127.0.0.1:{port}",
             f"block:path={tmp_path / 'disk.img'},socket={sock}"],
            capture_output=True, text=True, timeout=120, env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run")),
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"pvcore: error: metrics 127.0.0.1:{port}: Address already in use; another process listens there: pick another port"
    ]
    assert not sock.exists()


@pytest.mark.parametrize("text", ["9464", "host:", ":9464", "host:0", "host:65536", "host:port"])
def test_a_bad_metrics_address_is_a_usage_error(text: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "serve", "--metrics", text, "block:path=x"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "expected HOST:PORT" in done.stderr


def test_metrics_address_forms() -> None:
    assert MetricsAddress.parse("127.0.0.1:9464") == MetricsAddress("127.0.0.1", 9464)
    assert MetricsAddress.parse("[::1]:9464") == MetricsAddress("::1", 9464)
    assert str(MetricsAddress("::1", 9464)) == "[::1]:9464"


def test_service_time_histogram_buckets_are_inclusive_upper_bounds() -> None:
    histogram = ServiceTimeHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.5):
        histogram.observe(seconds)
    times = histogram.snapshot()
    assert times.counts == (2, 1, 1) and times.observations == 4 and times.total == pytest.approx(0.5035)
    with pytest.raises(ValueError):
        ServiceTimeHistogram((0.01, 0.001))


class RecordingPort(Port):
    """A station that takes every frame (the switch's counters are the subject here)."""

    def deliver(self, frame: bytes) -> bool:
        return True


def frame(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x08\x00" + bytes(46)


def samples(collector: DeviceCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_switch_and_nic_families_count_forwarded_flooded_and_forged_frames() -> None:
    switch = Switch("lan0")
    mac_a, mac_b = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
    port_a, port_b = RecordingPort("vm1-net", mac_a), RecordingPort("vm2-net", mac_b)
    switch.attach(port_a)
    switch.attach(port_b)
    switch.forward(port_a, frame(b"\xff" * 6, mac_a))  # broadcast: flooded
    switch.forward(port_a, frame(mac_b, mac_a))  # known destination: forwarded
    switch.forward(port_a, frame(mac_b, mac_a))
    switch.forward(port_a, frame(mac_b, mac_b))  # vm1 forging vm2's address: dropped
    config = DeviceConfig("net", "vm1-net", {"domain": "vm1"})
    instance = type("Instance", (), {"config": config, "engine": NetEndpoint("vm1-net", mac_a, switch)})()
    collector = DeviceCollector(lambda: [ServedEntry(instance, object(), "kvm")])
    seen = samples(collector)
    labels = (("class", "net"), ("device", "vm1-net"), ("domain", "vm1"), ("hypervisor", "kvm"))
    assert seen[("pvcore_switch_frames_total", (("outcome", "forwarded"), ("switch", "lan0")))] == 2
    assert seen[("pvcore_switch_frames_total", (("outcome", "flooded"), ("switch", "lan0")))] == 1
    assert seen[("pvcore_switch_frames_total", (("outcome", "dropped_forged"), ("switch", "lan0")))] == 1
    assert seen[("pvcore_requests_total", tuple(sorted((*labels, ("op", "tx")))))] == 3
    assert seen[("pvcore_requests_total", tuple(sorted((*labels, ("op", "rx")))))] == 0
    assert seen[("pvcore_request_bytes_total", tuple(sorted((*labels, ("op", "tx")))))] == 3 * 60
    assert seen[("pvcore_errors_total", tuple(sorted((*labels, ("reason", "forged")))))] == 1


def test_the_metrics_key_of_a_config_file_serves_the_endpoint(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "disk.img").write_bytes(bytes(MIB))
    config = tmp_path / "pvcore.toml"
    config.write_text(
        f'hypervisor = "lpar"\nmetrics = "127.0.0.1:{port}"\n'
        f'[[device]]\nclass = "block"\npath = "{tmp_path / "disk.img"}"\nsocket = "{tmp_path / "vm1-disk.sock"}"\n'
    )
    serve, log = start_serve(tmp_path, "--config", str(config))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        stop(serve)
    assert 'pvcore_requests_total{class="block",device="vm1-disk",domain="vm1",hypervisor="lpar",op="read"} 0.0' in text
    assert serve.returncode == 0, log.read_text()


def scrape(port: int) -> dict[str, float]:
    """The samples of the endpoint at ``port``: value by the sample's text up to its value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in lines if line.startswith("pvcore_")}


def test_a_vhost_user_disk_counts_its_ring_completions_and_interrupts(tmp_path: Path) -> None:
    from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
    from pvcore.testing.vhost_user_frontend import VhostUserFrontend

    (tmp_path / "disk.img").write_bytes(bytes(MIB))
    sock = tmp_path / "vm1-vda.sock"
    port = free_port()
    serve, log = start_serve(
        tmp_path, "--hypervisor", "kvm", "--metrics", f"127.0.0.1:{port}",
        f"block:path={tmp_path / 'disk.img'},socket={sock},poll-max-us=32",
    )
    labels = 'class="block",device="vm1-vda",domain="vm1",hypervisor="kvm"'
    try:
        frontend = VhostUserFrontend.connect(sock, timeout=60.0)
        frontend.start(num_queues=1, queue_size=64)
        for sector in range(10):
            used = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector * 8)], [4096, 1], timeout=60.0)
            assert used.data[-1] == VIRTIO_BLK_S_OK
        seen = scrape(port)
        frontend.close()
    finally:
        stop(serve)
    assert seen[f'pvcore_requests_total{{{labels},op="read"}}'] == 10
    assert seen[f'pvcore_request_bytes_total{{{labels},op="read"}}'] == 10 * 4096
    assert seen[f"pvcore_ring_completions_total{{{labels}}}"] == 10
    assert 1 <= seen[f"pvcore_interrupts_total{{{labels}}}"] <= 10  # one request at a time: batching may merge few
    assert seen[f"pvcore_inflight_requests{{{labels}}}"] == 0
    # with poll-max-us= its windows are counted, whether or not this driver was fast enough to be caught
    assert 0 <= seen[f"pvcore_ring_polls_caught_total{{{labels}}}"] <= seen[f"pvcore_ring_polls_total{{{labels}}}"]
    assert seen[f"pvcore_ring_poll_seconds_total{{{labels}}}"] >= 0
