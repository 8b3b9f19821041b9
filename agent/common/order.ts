/**
 * Code-point order of two strings, for sort comparators. Not `localeCompare`: the first
 * `localeCompare` of a process sets up ICU's collator, which maps ~3 MiB of the node
 * binary's ICU data into the daemon's resident memory for good (docs/performance.md,
 * "Footprint: what each step saved"), to order ISO timestamps, notice ids and names that
 * code-point order sorts the same way (ISO 8601 strings sort in time order).
 */
export function byCodePoint(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
