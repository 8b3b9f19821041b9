/** No name, however crafted, reaches outside the root or collides with an interface file. */
import { isCgroupError } from '../../../cgroup-adapter/errors';
import { checkSegment, parseGroup, resolveBeneath } from '../../../cgroup-adapter/names';
import { HOSTILE_NAMES } from './hostile-names';

const ROOT = '/sys/fs/cgroup/unified/nestbroker-test-1';

function refusal(
  f: () => unknown,
): { code?: string; field?: string; message?: string } | undefined {
  try {
    f();
  } catch (e) {
    if (!isCgroupError(e)) throw e;
    return { code: e.code, field: e.field, message: e.message };
  }
  return undefined;
}

describe('strict group names', () => {
  it.each([
    'web',
    'a',
    '0',
    'web-1',
    'web_2',
    'web.v2',
    'a'.repeat(63),
    'projects/web',
    'cpuweb',
    'memoryhog',
  ])('accepts %p', (n) => expect(resolveBeneath(ROOT, n)).toBe(`${ROOT}/${n}`));

  it.each(HOSTILE_NAMES)('refuses %j with NAME_INVALID or OUTSIDE_ROOT', (n) => {
    const r = refusal(() => resolveBeneath(ROOT, n));
    expect(r).toBeDefined();
    expect(['NAME_INVALID', 'OUTSIDE_ROOT']).toContain(r!.code);
  });

  it('names the field and the value it refused', () => {
    const r = refusal(() => parseGroup('cgroup.procs', { field: 'projects[2].name' }));
    expect(r).toMatchObject({ code: 'NAME_INVALID', field: 'projects[2].name' });
    expect(r!.message).toContain('projects[2].name');
    expect(r!.message).toContain('"cgroup.procs"');
  });

  it('accepts "" only as the root itself, and only when asked', () => {
    expect(resolveBeneath(ROOT, '', { allowRoot: true })).toBe(ROOT);
    expect(refusal(() => resolveBeneath(ROOT, ''))?.code).toBe('NAME_INVALID');
  });

  it('refuses a relative root', () => {
    expect(refusal(() => resolveBeneath('sys/fs/cgroup', 'web'))?.code).toBe('OUTSIDE_ROOT');
  });
});

describe('systemd names (operator-configured existing groups)', () => {
  it.each([
    'machine.slice',
    'machine-qemu\\x2d1\\x2dvm1.scope',
    'user@1000.service',
    'system.slice/foo:bar.service',
  ])('accepts %p', (n) =>
    expect(resolveBeneath('/sys/fs/cgroup', n, { mode: 'systemd' })).toBe(`/sys/fs/cgroup/${n}`),
  );
  it.each([
    '..',
    '.',
    'a/../..',
    'a\0',
    '/x',
    'cgroup.procs',
    'memory.max',
    'tasks',
    'a b',
    'é',
    '',
  ])('refuses %j', (n) =>
    expect(['NAME_INVALID', 'OUTSIDE_ROOT']).toContain(
      refusal(() => resolveBeneath('/sys/fs/cgroup', n, { mode: 'systemd' }))?.code,
    ),
  );
  it('checks a single segment without "/"', () => {
    expect(refusal(() => checkSegment('a/b', 'systemd'))?.code).toBe('NAME_INVALID');
  });
});
