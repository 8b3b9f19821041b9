import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { parse } from 'yaml';
import { validateGuestConfig } from '../../../agent/guest/config';

test('the guest config shown in the README is valid as written', () => {
  const readme = readFileSync(path.join(__dirname, '../../../README.md'), 'utf8');
  const block = /```yaml\n([\s\S]*?)```/.exec(readme);
  expect(block).not.toBeNull();
  const cfg = validateGuestConfig(parse(block![1]), 'README.md');
  expect(cfg.projects.map((p) => [p.name, p.priority])).toEqual([
    ['web', 100],
    ['batch', 10],
  ]);
});
