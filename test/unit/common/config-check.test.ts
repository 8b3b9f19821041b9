/**
 * The one config validation layer (agent/common/config-check.ts) as both daemons see it:
 * the host's and the guest's config report the same kind of problem in the same words,
 * every problem at once, from the same file reading.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { checkConfig, field, knownKeysAt, opt, suggest } from '../../../agent/common/config-check';
import { isNestError, type NestError } from '../../../agent/common/errors';
import { parseSize } from '../../../agent/common/units';
import { loadHostConfig, validateHostConfig } from '../../../agent/host/config';
import { loadGuestConfig, validateGuestConfig } from '../../../agent/guest/config';

const host = {
  guests: [
    {
      name: 'vm1',
      priority: 1,
      allocation: { cpus: 1, memory: '1GiB' },
      channel: { transport: 'unix', path: '/run/vm1.sock' },
    },
  ],
};
const guest = { guest: 'vm1', projects: [] };

function refusal(f: () => unknown): NestError {
  try {
    f();
  } catch (e) {
    if (isNestError(e, 'CONFIG_INVALID')) return e;
    throw e;
  }
  throw new Error('expected CONFIG_INVALID');
}

async function refusalAsync(p: Promise<unknown>): Promise<NestError> {
  return p.then(
    () => {
      throw new Error('expected a refusal');
    },
    (e: unknown) => e as NestError,
  );
}

test('a misspelt key: the same words from the host and the guest, with the nearest key', () => {
  const h = refusal(() => validateHostConfig({ ...host, sockt: '/x' }, '/etc', 'host.yaml'));
  const g = refusal(() => validateGuestConfig({ ...guest, sockt: '/x' }, 'guest.yaml'));
  for (const e of [h, g]) {
    expect(e.problems).toEqual([
      {
        field: 'sockt',
        value: '/x',
        message: expect.stringMatching(
          /^is not a known key \(did you mean "socket"\?\); known here: /,
        ),
      },
    ]);
  }
  expect(h.message).toMatch(/^host\.yaml: 1 problem:\n {2}sockt: is not a known key/);
  expect(g.message).toMatch(/^guest\.yaml: 1 problem:\n {2}sockt: is not a known key/);
});

test('an empty document names the keys each config needs', () => {
  expect(refusal(() => validateHostConfig(null)).problems).toEqual([
    {
      field: '(top level)',
      value: null,
      message: 'must be a mapping with at least "guests", got an empty document',
    },
  ]);
  expect(refusal(() => validateGuestConfig(['x'], 't')).problems[0].message).toBe(
    'must be a mapping with at least "guest" and "projects", got a list',
  );
});

test('both read files the same way: a key given twice is refused with its line', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-cfgcheck-'));
  try {
    const h = path.join(dir, 'host.yaml');
    await fs.writeFile(h, 'socket: /a.sock\nsocket: /b.sock\nguests: []\n');
    const g = path.join(dir, 'guest.yaml');
    await fs.writeFile(g, 'guest: vm1\nguest: vm2\nprojects: []\n');
    for (const e of [
      await refusalAsync(loadHostConfig(h)),
      await refusalAsync(loadGuestConfig(g)),
    ]) {
      expect(e.code).toBe('CONFIG_INVALID');
      expect(e.problems).toEqual([
        {
          field: '(line 2, column 1)',
          value: undefined,
          message: expect.stringMatching(/unique/i),
        },
      ]);
    }
    const missing = await refusalAsync(loadHostConfig(path.join(dir, 'none.yaml')));
    expect(missing).toMatchObject({
      code: 'CONFIG_UNREADABLE',
      problems: [{ field: '(file)', message: 'cannot be read: ENOENT' }],
    });
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('"did you mean": case, snake_case and up to two edits; nothing for a word far off', () => {
  const known = ['stateDir', 'socket', 'socketGroup', 'projects'];
  expect(suggest('state_dir', known)).toBe('stateDir');
  expect(suggest('StateDir', known)).toBe('stateDir');
  expect(suggest('socketGrop', known)).toBe('socketGroup');
  expect(suggest('projcts', known)).toBe('projects');
  expect(suggest('colour', known)).toBeUndefined();
});

test('a schema of its own: single values, unknown keys and cross checks all in one report', () => {
  const schema = z
    .object({
      min: field(parseSize),
      max: opt(parseSize),
      channel: z.discriminatedUnion('kind', [
        z.object({ kind: z.literal('file'), path: z.string() }).strict(),
        z.object({ kind: z.literal('tcp'), host: z.string(), port: z.number() }).strict(),
      ]),
    })
    .strict();
  const raw = {
    min: '2 parsecs',
    max: '1GiB',
    mx: 3,
    channel: { kind: 'tcp', hots: 'h', port: 1 },
  };
  expect(knownKeysAt(schema, raw, ['channel'])).toEqual(['kind', 'host', 'port']);
  let err: NestError | undefined;
  try {
    checkConfig(schema, raw, {
      source: 'own',
      cross: () => ({
        problems: [{ field: 'max', value: '1GiB', message: 'must not be below min' }],
      }),
    });
  } catch (e) {
    err = e as NestError;
  }
  expect(err?.problems.map((p) => [p.field, p.value])).toEqual(
    expect.arrayContaining([
      ['min', '2 parsecs'],
      ['mx', 3],
      ['channel.hots', 'h'],
      ['channel.host', undefined],
      ['max', '1GiB'],
    ]),
  );
  expect(err?.problems).toHaveLength(5);
  expect(err?.problems.find((p) => p.field === 'channel.hots')?.message).toBe(
    'is not a known key (did you mean "host"?); known here: kind, host, port',
  );
});
