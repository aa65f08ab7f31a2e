import { z } from "zod";

/**
 * The market's clock: an AlmanacTick is a non-negative integer count of ticks since the
 * almanac's genesis. Wall time = genesis + tick * tick_seconds.
 */
export const AlmanacTick = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
export type AlmanacTick = z.infer<typeof AlmanacTick>;

export class Almanac {
  readonly genesisMs: number;
  readonly tickMs: number;

  constructor(genesis: Date, tickSeconds: number) {
    if (!Number.isFinite(genesis.getTime())) throw new Error("almanac genesis is not a valid date");
    if (!(tickSeconds > 0)) throw new Error("almanac tick_seconds must be > 0");
    this.genesisMs = genesis.getTime();
    this.tickMs = tickSeconds * 1000;
  }

  /** Wall-clock milliseconds at which `tick` begins. */
  toWallMs(tick: AlmanacTick): number {
    return this.genesisMs + tick * this.tickMs;
  }

  toDate(tick: AlmanacTick): Date {
    return new Date(this.toWallMs(tick));
  }

  /** The tick in progress at wall time `ms` (floor); negative before genesis is clamped to 0. */
  tickAt(ms: number): AlmanacTick {
    return Math.max(0, Math.floor((ms - this.genesisMs) / this.tickMs));
  }
}
