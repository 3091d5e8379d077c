"""/host/info from a fake sysfs and pci.ids (and, read-only, from this machine's)."""
from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.fs.hostinfo import PciNames, host_info, parse_pci_ids, physical_disks
from portainer_agent.fs.pool import run_inline
from portainer_agent.http.hostinfo import HostInfoResource
from tests.unit.memory import Memory
from tests.unit.tempdirs import temp_dir

PCI_IDS = """# comment
8086  Intel Corporation
\t0d57  Some Bridge
\t\t1234 5678  A subsystem
1af4  Red Hat, Inc.
\t1001  Virtio block device
C 06  Bridge
\t00  Host bridge
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_host(root: Path) -> None:
    write(root / "usr/share/misc/pci.ids", PCI_IDS)
    write(root / "sys/bus/pci/devices/0000:00:00.0/vendor", "0x8086\n")
    write(root / "sys/bus/pci/devices/0000:00:00.0/device", "0x0d57\n")
    write(root / "sys/bus/pci/devices/0000:00:00.0/class", "0x060000\n")
    write(root / "sys/bus/pci/devices/0000:00:05.0/vendor", "0xabcd\n")
    write(root / "sys/bus/pci/devices/0000:00:05.0/device", "0x0001\n")
    for name, size, vendor in (("sda", "1000", "ATA     \n"), ("vda", "2048", "0x1af4\n"), ("xvdb", "8", None),
                               ("nvme0n1", "16", None), ("loop0", "100", None), ("zram0", "5", None),
                               ("dm-0", "5", None), ("sr0", "5", None)):
        write(root / "sys/block" / name / "size", size + "\n")
        if vendor is not None:
            write(root / "sys/block" / name / "device/vendor", vendor)


class HostInfoTests(SynchronousTestCase):
    def test_devices_and_disks(self) -> None:
        root = temp_dir(self)
        fake_host(root)
        document = host_info(root, PciNames())
        self.assertEqual([(d["Vendor"], d["Name"]) for d in document["PCIDevices"]],
                         [("Intel Corporation", "Some Bridge"), ("unknown", "unknown")])
        self.assertEqual(document["PCIDevices"][1]["VendorID"], "abcd")
        disks = {d["Name"]: d for d in document["PhysicalDisks"]}
        self.assertEqual(sorted(disks), ["nvme0n1", "sda", "vda", "xvdb"])
        self.assertEqual((disks["sda"]["Vendor"], disks["sda"]["Size"]), ("ATA", 512000))
        self.assertEqual(disks["vda"]["Vendor"], "Red Hat, Inc.")
        self.assertEqual(disks["xvdb"]["Vendor"], "unknown")

    def test_unreadable_directories_are_null(self) -> None:
        root = temp_dir(self)
        (root / "sys" / "bus").mkdir(parents=True)
        document = host_info(root, PciNames())
        self.assertIsNone(document["PCIDevices"])
        self.assertIsNone(physical_disks(root / "sys", {}))

    def test_parse_pci_ids_skips_subsystems_and_classes(self) -> None:
        vendors, devices = parse_pci_ids(PCI_IDS)
        self.assertEqual(vendors, {"8086": "Intel Corporation", "1af4": "Red Hat, Inc."})
        self.assertEqual(devices[("1af4", "1001")], "Virtio block device")
        self.assertNotIn(("8086", "1234"), devices)

    def test_endpoint_on_this_machine_lists_its_disk(self) -> None:
        """No /host here: falls back to /sys (read-only) and lists this machine's disk."""
        memory = Memory(endpoints={b"/host/info": HostInfoResource(Path("/nonexistent-host-root"), run_inline)})
        self.addCleanup(memory.stop)
        d = memory.client.get("http://agent/v2/host/info")
        memory.pump()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        memory.pump()
        self.assertEqual(response.code, 200)
        document = json.loads(body)
        self.assertIn("PCIDevices", document)
        if Path("/sys/block").is_dir() and any(Path("/sys/block").glob("[sv]d*")):
            self.assertTrue(document["PhysicalDisks"])
