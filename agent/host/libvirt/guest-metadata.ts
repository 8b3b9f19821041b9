/**
 * A domain's own nestbroker settings, in its `<metadata>` (libvirt's formatdomain,
 * "General metadata"; set with `virsh metadata --uri URI --key nestbroker --set XML`),
 * for `guests: auto` (docs/libvirt.md, "guests: auto"):
 *
 *   <metadata>
 *     <nestbroker:guest xmlns:nestbroker="https://nestbroker.invalid/xmlns/guest/1" name="vm1">
 *       <nestbroker:priority>10</nestbroker:priority>
 *       <nestbroker:floor cpus="1" memory="2GiB"/>
 *       <nestbroker:cpuMode>unplug</nestbroker:cpuMode>
 *       <nestbroker:memoryMode>virtio-mem</nestbroker:memoryMode>
 *       <nestbroker:confirmTimeout>60s</nestbroker:confirmTimeout>
 *     </nestbroker:guest>
 *   </metadata>
 *
 * The element is found by its namespace URI, whatever prefix it was given. Each child is
 * the host.yaml key of the same name; the entry is then checked by host.yaml's own schema
 * (agent/host/config.ts validateGuestEntry), so a value means the same in both places.
 * This file only turns the XML into that entry, naming what it cannot read.
 */
import { XMLParser } from 'fast-xml-parser';
import type { Problem } from '../../common/errors';

/** The namespace of nestbroker's domain metadata (`.invalid`: never resolved, RFC 2606). */
export const NESTBROKER_XMLNS = 'https://nestbroker.invalid/xmlns/guest/1';
/** The prefix docs and examples use (`virsh metadata --key nestbroker`). */
export const NESTBROKER_XMLNS_KEY = 'nestbroker';

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@',
  textNodeName: '#text',
  parseAttributeValue: false,
  parseTagValue: false,
  // A setting given twice is an error, so the guest element's children are always lists.
  isArray: (_name, jpath, _leaf, isAttribute) =>
    !isAttribute &&
    String(jpath).startsWith('domain.metadata.') &&
    String(jpath).split('.').length === 4,
});

type Node = Record<string, unknown>;

/** Children whose text is the value (`<priority>10</priority>`). */
const TEXT_KEYS = new Set(['priority', 'cpuMode', 'memoryMode', 'confirmTimeout']);
/** Children whose attributes are the value (`<floor cpus="1" memory="2GiB"/>`). */
const PAIR_KEYS: Record<string, readonly string[]> = {
  floor: ['cpus', 'memory'],
  allocation: ['cpus', 'memory'],
};
/** A number where host.yaml would have a YAML number; anything else stays a string. */
const NUMBER = /^-?\d+(\.\d+)?$/;
const asValue = (s: string): string | number => (NUMBER.test(s.trim()) ? Number(s.trim()) : s);

export type GuestMetadata =
  | { found: false }
  /** `entry` is host.yaml-shaped (not checked yet); `problems` what the XML itself got wrong. */
  | { found: true; entry: Record<string, unknown>; problems: Problem[] };

/** Reads the nestbroker element of a domain's XML (`virsh dumpxml`). */
export function readGuestMetadata(xml: string): GuestMetadata {
  let doc: Node;
  try {
    doc = parser.parse(xml, true) as Node;
  } catch {
    return { found: false };
  }
  const meta = ((doc.domain as Node | undefined)?.metadata ?? {}) as Node;
  if (typeof meta !== 'object') return { found: false };
  for (const [tag, nodes] of Object.entries(meta)) {
    for (const node of Array.isArray(nodes) ? (nodes as Node[]) : [nodes as Node]) {
      if (!node || typeof node !== 'object') continue;
      const prefix = tag.includes(':') ? tag.slice(0, tag.indexOf(':')) : '';
      const xmlns = node[prefix ? `@xmlns:${prefix}` : '@xmlns'];
      if (xmlns !== NESTBROKER_XMLNS || tag.slice(prefix ? prefix.length + 1 : 0) !== 'guest')
        continue;
      return { found: true, ...entryOf(node, prefix) };
    }
  }
  return { found: false };
}

function entryOf(
  node: Node,
  prefix: string,
): { entry: Record<string, unknown>; problems: Problem[] } {
  const entry: Record<string, unknown> = {};
  const problems: Problem[] = [];
  const name = node['@name'];
  if (typeof name === 'string') entry.name = name;
  for (const [tag, value] of Object.entries(node)) {
    if (tag.startsWith('@') || tag === '#text') continue;
    const key = prefix && tag.startsWith(`${prefix}:`) ? tag.slice(prefix.length + 1) : tag;
    const one = (Array.isArray(value) ? value : [value]) as unknown[];
    if (one.length > 1) {
      problems.push({ field: key, value: one.length, message: `is given ${one.length} times` });
      continue;
    }
    const v = one[0];
    if (TEXT_KEYS.has(key)) {
      const t = typeof v === 'string' ? v : (v as Node | undefined)?.['#text'];
      if (typeof t !== 'string' || t.trim() === '')
        problems.push({ field: key, value: v, message: `must be <${key}>VALUE</${key}>` });
      else entry[key] = asValue(t);
    } else if (PAIR_KEYS[key]) {
      const attrs = (typeof v === 'object' && v ? v : {}) as Node;
      const pair: Record<string, unknown> = {};
      for (const [a, av] of Object.entries(attrs)) {
        const an = a.startsWith('@') ? a.slice(1) : a;
        if (!PAIR_KEYS[key].includes(an) || typeof av !== 'string')
          problems.push({
            field: `${key}.${an}`,
            value: av,
            message: `is not an attribute of <${key}> (${PAIR_KEYS[key].join(', ')})`,
          });
        else pair[an] = an === 'cpus' ? asValue(av) : av;
      }
      entry[key] = pair;
    } else
      problems.push({
        field: key,
        value: v,
        message: `is not a nestbroker guest setting (${[...TEXT_KEYS, ...Object.keys(PAIR_KEYS)].join(', ')})`,
      });
  }
  return { entry, problems };
}
