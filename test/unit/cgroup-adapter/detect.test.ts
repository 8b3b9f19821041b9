/** Layout detection from mountinfo text, and /proc/self/cgroup parsing. */
import {
  detectLayout,
  parseMountinfo,
  parseProcCgroup,
  pathRelativeToMount,
} from '../../../cgroup-adapter/detect';
import { isCgroupError } from '../../../cgroup-adapter/errors';

// This build machine: cgroup2 at /sys/fs/cgroup/unified, cpu and cpuacct separate.
const HYBRID_SEPARATE = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`;

// RHEL 8 / systemd hybrid: cpu,cpuacct comounted with symlinks cpu -> cpu,cpuacct.
const HYBRID_COMOUNTED = `25 24 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:6 - cgroup cgroup rw,xattr,name=systemd
31 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
32 25 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
`;

// Debian 12 / RHEL 9: unified only.
const PURE_V2 = `24 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
`;

const PURE_V1 = `32 31 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n`;

describe('detectLayout', () => {
  it('sees this machine as hybrid, with cpu and cpuacct as separate mounts', () => {
    const l = detectLayout(HYBRID_SEPARATE);
    expect(l.kind).toBe('hybrid');
    expect(l.unified.mountPoint).toBe('/sys/fs/cgroup/unified');
    expect(l.v1.cpu?.mountPoint).toBe('/sys/fs/cgroup/cpu');
    expect(l.v1.cpuacct?.mountPoint).toBe('/sys/fs/cgroup/cpuacct');
    expect(l.v1.memory?.mountPoint).toBe('/sys/fs/cgroup/memory');
    expect(l.v1.pids?.mountPoint).toBe('/sys/fs/cgroup/pids');
    expect(l.v1.cpuset?.mountPoint).toBe('/sys/fs/cgroup/cpuset');
  });

  it('sees comounted cpu,cpuacct as one hierarchy, and ignores name=systemd', () => {
    const l = detectLayout(HYBRID_COMOUNTED);
    expect(l.kind).toBe('hybrid');
    expect(l.v1.cpu).toBe(l.v1.cpuacct);
    expect(l.v1.cpu?.mountPoint).toBe('/sys/fs/cgroup/cpu,cpuacct');
    expect(l.v1.cpu?.controllers).toEqual(['cpu', 'cpuacct']);
    expect(l.v1.pids).toBeUndefined();
  });

  it('sees a unified-only machine as v2', () => {
    const l = detectLayout(PURE_V2);
    expect(l).toMatchObject({ kind: 'v2', unified: { mountPoint: '/sys/fs/cgroup' }, v1: {} });
  });

  it('refuses pure v1 with NOT_DETECTED', () => {
    try {
      detectLayout(PURE_V1);
      throw new Error('expected NOT_DETECTED');
    } catch (e) {
      expect(isCgroupError(e, 'NOT_DETECTED')).toBe(true);
    }
  });

  it('unescapes mount points with spaces', () => {
    const m = parseMountinfo('41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n');
    expect(m[0].mountPoint).toBe('/mnt/my cg');
  });
});

describe('/proc/self/cgroup', () => {
  it('parses hybrid lines, comounted lists and the unified line', () => {
    const pc = parseProcCgroup(
      '9:name=systemd:/\n4:memory:/process_api/f9fe\n2:cpu,cpuacct:/system.slice/x.service\n0::/system.slice/x.service\n',
    );
    expect(pc.unified).toBe('/system.slice/x.service');
    expect(pc.v1).toEqual({
      memory: '/process_api/f9fe',
      cpu: '/system.slice/x.service',
      cpuacct: '/system.slice/x.service',
    });
  });

  it('makes a path relative to a mount that shows only a subtree (cgroup namespace)', () => {
    const [m] = parseMountinfo('41 31 0:38 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n');
    expect(pathRelativeToMount(m, '/docker/abc/agent')).toBe('agent');
    expect(() => pathRelativeToMount(m, '/elsewhere')).toThrow(/not visible/);
  });
});
