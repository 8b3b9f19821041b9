/**
 * Small comparators composed into rankings (kubelet eviction's `orderedBy(...)`,
 * CONTRIBUTING.md).
 *
 * One vocabulary at every level of the nesting: the guest planner ranks projects with it,
 * and the host broker ranks guests with it when it chooses which give first. A comparator
 * returns < 0 when `a` comes first. Every ranking ends with `byName` so the order never
 * depends on the input order (the planner must be deterministic).
 */

export type Comparator<T> = (a: T, b: T) => number;

/** Something that can be ranked: a project in a guest, or a guest on a host. */
export interface Rankable {
  name: string;
  /** Higher keeps longer. */
  priority: number;
  /**
   * How much it holds above its guaranteed minimum, in one comparable number (the planner
   * uses the share of the allocation: memory above min / allocation memory + CPUs above
   * min / allocation CPUs). Missing data rule: `undefined` or NaN ranks as using the most,
   * so a child we cannot observe gives before one we can see is lean.
   */
  usageAboveMin?: number;
}

/** The first comparator that tells `a` and `b` apart decides. */
export function orderedBy<T>(...cmps: Comparator<T>[]): Comparator<T> {
  return (a, b) => {
    for (const cmp of cmps) {
      const r = cmp(a, b);
      if (r !== 0) return r;
    }
    return 0;
  };
}

/** The same ranking, back to front. */
export function reversed<T>(cmp: Comparator<T>): Comparator<T> {
  return (a, b) => cmp(b, a);
}

export const byPriorityAsc: Comparator<Pick<Rankable, 'priority'>> = (a, b) =>
  a.priority - b.priority;

export const byPriorityDesc: Comparator<Pick<Rankable, 'priority'>> = reversed(byPriorityAsc);

function aboveMin(r: Pick<Rankable, 'usageAboveMin'>): number {
  const v = r.usageAboveMin;
  return v === undefined || Number.isNaN(v) ? Number.POSITIVE_INFINITY : v;
}

/** Uses most above its minimum first (unknown usage counts as the most). */
export const byUsageAboveMinDesc: Comparator<Pick<Rankable, 'usageAboveMin'>> = (a, b) => {
  const x = aboveMin(a);
  const y = aboveMin(b);
  return x === y ? 0 : x > y ? -1 : 1;
};

/**
 * By code unit, not `localeCompare`: the order must not change with the machine's locale.
 * Names are checked ASCII anyway.
 */
export const byName: Comparator<Pick<Rankable, 'name'>> = (a, b) =>
  a.name < b.name ? -1 : a.name > b.name ? 1 : 0;

/**
 * Who gives first (docs/architecture.md, "Why it is built this way"): lowest priority;
 * within a priority the one using most above its minimum; then by name.
 */
export const givesFirst: Comparator<Rankable> = orderedBy<Rankable>(
  byPriorityAsc,
  byUsageAboveMinDesc,
  byName,
);

/** Who keeps longest, and who gets room first when resources come back: exactly the reverse. */
export const keepsFirst: Comparator<Rankable> = reversed(givesFirst);
