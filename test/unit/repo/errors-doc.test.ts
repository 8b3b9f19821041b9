/**
 * docs/errors.md is the error catalog as a contract: every code of NestError
 * (agent/common/errors.ts) and of CgroupError (cgroup-adapter/errors.ts) has its row, every
 * row names a code that exists, and each row's exit column is the exit status nestctl
 * really gives for that code (agent/cli/format.ts, agent/cli/host-commands.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { ErrorCodes, NestError, type ErrorCode } from '../../../agent/common/errors';
import {
  CgroupError,
  CgroupErrorCodes,
  type CgroupErrorCode,
} from '../../../cgroup-adapter/errors';
import { exitForError } from '../../../agent/cli/format';
import { exitForHostError } from '../../../agent/cli/host-commands';

const ROOT = path.resolve(__dirname, '../../..');
const doc = fs.readFileSync(path.join(ROOT, 'docs', 'errors.md'), 'utf8');

interface Row {
  code: string;
  meaning: string;
  exit: string;
  action: string;
}

/** The table rows of one `## <title>` section: `| \`CODE\` | meaning | exit | action |`. */
function rows(title: string): Row[] {
  const start = doc.indexOf(`\n## ${title}\n`);
  expect({ title, found: start >= 0 }).toEqual({ title, found: true });
  const next = doc.indexOf('\n## ', start + 1);
  const section = doc.slice(start, next < 0 ? undefined : next);
  return section
    .split('\n')
    .filter((l) => /^\| `[A-Z_]+` \|/.test(l))
    .map((l) => {
      const cells = l
        .slice(1, -1)
        .split(' | ')
        .map((c) => c.trim());
      return {
        code: cells[0].replace(/`/g, ''),
        meaning: cells[1] ?? '',
        exit: cells[2] ?? '',
        action: cells[3] ?? '',
      };
    });
}

const nest = rows('NestError codes');
const cgroup = rows('CgroupError codes');

test('every NestError code has a row, and every row is a NestError code', () => {
  const inDoc = nest.map((r) => r.code);
  expect(inDoc.filter((c) => !(c in ErrorCodes))).toEqual([]);
  expect(Object.keys(ErrorCodes).filter((c) => !inDoc.includes(c))).toEqual([]);
  expect(new Set(inDoc).size).toBe(inDoc.length);
});

test('every CgroupError code has a row, and every row is a CgroupError code', () => {
  const inDoc = cgroup.map((r) => r.code);
  expect(inDoc.filter((c) => !(c in CgroupErrorCodes))).toEqual([]);
  expect(Object.keys(CgroupErrorCodes).filter((c) => !inDoc.includes(c))).toEqual([]);
  expect(new Set(inDoc).size).toBe(inDoc.length);
});

test("each row's exit is the status nestctl gives for that code", () => {
  const wrong: string[] = [];
  for (const r of nest) {
    const err = new NestError(r.code as ErrorCode, 'x');
    const host = exitForHostError(err);
    if (r.exit !== String(host)) wrong.push(`${r.code}: doc ${r.exit}, nestctl ${host}`);
    // The guest's nestctl gives the same, for every code a guest agent can raise.
    if (!r.code.startsWith('GUEST_') && exitForError(err) !== host)
      wrong.push(`${r.code}: nestctl --guest ${exitForError(err)}, host ${host}`);
  }
  for (const r of cgroup) {
    const got = exitForHostError(new CgroupError(r.code as CgroupErrorCode, 'x'));
    if (r.exit !== String(got)) wrong.push(`${r.code}: doc ${r.exit}, nestctl ${got}`);
  }
  expect(wrong).toEqual([]);
});

test('every row says what the code means and what an operator does about it', () => {
  const thin = [...nest, ...cgroup]
    .filter((r) => r.meaning.length < 20 || r.action.length < 10)
    .map((r) => r.code);
  expect(thin).toEqual([]);
});

test('the README and docs/reliability.md point at the catalog', () => {
  for (const f of ['README.md', 'docs/reliability.md'])
    expect({ f, links: /errors\.md/.test(fs.readFileSync(path.join(ROOT, f), 'utf8')) }).toEqual({
      f,
      links: true,
    });
});
