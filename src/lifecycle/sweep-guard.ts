/**
 * Orphan sweeps with several replicas (issue #19). The leader sweeps against its snapshot of the
 * live grants; a grant another replica accepts a moment after that snapshot, and starts at once,
 * has resources the sweep may find without a live grant. Cloud backends are covered by their own
 * grace (orphan_grace_seconds, counted from first sight); the local and bare-metal backends ask
 * `live.has(id)` of every run they find, and the set this guard hands them answers "live" for an
 * id the first sweep that finds it without a grant: a run counts as an orphan only when two
 * consecutive sweeps (a reconcile interval apart) found it so.
 */
export class SweepGuard {
  /** Ids asked about and found without a live grant in the previous sweep. */
  private absent = new Set<string>();

  /** The live set for one sweep: `snapshot`, plus every id not yet absent in the sweep before. */
  pass(snapshot: Iterable<string>): ReadonlySet<string> {
    const previous = this.absent;
    const now = new Set<string>();
    this.absent = now;
    return new GuardedLive(snapshot, (id) => {
      now.add(id);
      return !previous.has(id);
    });
  }
}

class GuardedLive extends Set<string> {
  constructor(
    snapshot: Iterable<string>,
    private readonly spare: (id: string) => boolean,
  ) {
    super(snapshot);
  }

  override has(id: string): boolean {
    return super.has(id) || this.spare(id);
  }
}
