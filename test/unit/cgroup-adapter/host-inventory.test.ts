/**
 * The host's inventory read from /proc/cpuinfo and /etc/os-release (cgroup-adapter/
 * host-usage.ts linuxInventory), not through systeminformation: on this machine it says
 * what systeminformation says, and it names a CPU the way systeminformation does.
 */
import * as os from 'node:os';
import { readFileSync } from 'node:fs';
import { hostInventory, linuxInventory } from '../../../cgroup-adapter/host-usage';

test('on this machine: what systeminformation reports, without loading it', async () => {
  const inv = await hostInventory();
  expect(Object.keys(require.cache).some((m) => m.includes('/systeminformation/'))).toBe(false);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const si = require('systeminformation') as typeof import('systeminformation');
  const [cpu, osi] = await Promise.all([si.cpu(), si.osInfo()]);
  expect(inv).toMatchObject({
    cpus: os.cpus().length,
    physicalCores: cpu.physicalCores,
    memTotalBytes: os.totalmem(),
    os: [osi.distro, osi.release].filter(Boolean).join(' '),
    kernel: osi.kernel,
    arch: osi.arch,
    cpuGHz: cpu.speed,
  });
  expect(inv.cpuModel).toBe([cpu.manufacturer, cpu.brand].filter(Boolean).join(' ').trim());
  expect(readFileSync('/proc/cpuinfo', 'utf8')).toContain('processor');
});

test('an Intel CPU with two threads a core, its clock in the model name; a quoted os-release', () => {
  const cpuinfo = [0, 1, 2, 3]
    .map(
      (p) =>
        `processor\t: ${p}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz\nphysical id\t: 0\ncore id\t\t: ${p >> 1}\n`,
    )
    .join('\n');
  expect(
    linuxInventory(cpuinfo, 'NAME="Debian GNU/Linux"\nVERSION_ID="13"\n', undefined),
  ).toMatchObject({
    cpuModel: 'Intel Xeon® E5-2690 v4',
    cpus: 4,
    physicalCores: 2,
    cpuGHz: 2.6,
    os: 'Debian GNU/Linux 13',
  });
  // The base clock from cpufreq wins over the name's.
  expect(linuxInventory(cpuinfo, '', 3_100_000)?.cpuGHz).toBe(3.1);
  expect(linuxInventory('', '', undefined)).toBeUndefined();
});
