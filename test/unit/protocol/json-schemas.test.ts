/**
 * The published JSON Schemas (docs/schemas/, docs/protocol.md "JSON Schemas") are what the
 * zod schemas generate now: a field added to a message without `make schemas` fails here.
 * Also that they say what a third party relies on: strict objects, the id pattern, the
 * optional capabilities list, and a file for every message type.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { generate } from '../../../tools/schemas';
import { MESSAGE_TYPES } from '../../../agent/protocol/schemas';

const DIR = path.resolve(__dirname, '../../../docs/schemas');
const fresh = generate();

test('every checked-in schema is byte for byte what the zod schemas generate (else: make schemas)', () => {
  const stale = [...fresh].filter(([f, text]) => {
    try {
      return readFileSync(path.join(DIR, f), 'utf8') !== text;
    } catch {
      return true;
    }
  });
  expect(stale.map(([f]) => f)).toEqual([]);
});

test('docs/schemas holds nothing the generator does not write', () => {
  expect(readdirSync(DIR).sort()).toEqual([...fresh.keys()].sort());
});

test('there is a schema for every message type, and the union names them all', () => {
  for (const t of MESSAGE_TYPES) expect(fresh.has(`${t}.json`)).toBe(true);
  const union = JSON.parse(fresh.get('message.json')!) as {
    anyOf: { properties: { type: { const: string } } }[];
  };
  expect(union.anyOf.map((s) => s.properties.type.const).sort()).toEqual([...MESSAGE_TYPES].sort());
});

test('host↔guest objects are closed (an unknown field is an error), project messages open', () => {
  const hello = JSON.parse(fresh.get('hello.json')!);
  expect(hello.additionalProperties).toBe(false);
  expect(hello.required).not.toContain('capabilities');
  expect(hello.properties.capabilities.items.pattern).toBe('^[a-z][a-z0-9-]{0,63}$');
  expect(hello.properties.id.pattern).toBe('^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$');
  expect(JSON.parse(fresh.get('project-notice.json')!).additionalProperties).toBe(true);
});
