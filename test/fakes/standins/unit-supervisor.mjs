#!/usr/bin/env node
// Per-unit supervisor behind the `systemd-run` stand-in: plays the part of
// systemd 252's service state machine for ONE transient Type=simple service.
//
//   node unit-supervisor.mjs UNITDIR
//
// UNITDIR (created by systemd-run) holds:
//   sv.conf   KEY=VALUE lines (see readConf)
//   argv      NUL-separated argv of the main command (argv[0] = resolved path)
//   env       NUL-separated environment of the unit
//   stoppost  NUL-separated raw ExecStopPost= values (unit-file syntax)
//   ready     FIFO; we write "ok <pid>" once the main process runs
// and we maintain UNITDIR/state.sh (sourced by the systemctl stand-in; always
// replaced atomically). SIGUSR1 or SIGTERM = "systemctl stop".
//
// The main process runs detached (setsid: its own session and process group,
// stdin /dev/null, stdout+stderr appended to the unit log). The session id
// stands in for the unit's cgroup: stop and leftover-killing target every live
// process of that session. Node reaps the main process, so its exact wait
// status (code vs signal, core dump) and its CPU time (our cutime+cstime after
// the reap) are exact.

import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const unitDir = process.argv[2];
if (!unitDir) {
  process.stderr.write('usage: unit-supervisor.mjs UNITDIR\n');
  process.exit(2);
}

const CLK_TCK = 100;
const SIGNAMES = ['0', 'HUP', 'INT', 'QUIT', 'ILL', 'TRAP', 'ABRT', 'BUS', 'FPE', 'KILL', 'USR1', 'SEGV', 'USR2',
  'PIPE', 'ALRM', 'TERM', 'STKFLT', 'CHLD', 'CONT', 'STOP', 'TSTP', 'TTIN', 'TTOU', 'URG', 'XCPU', 'XFSZ',
  'VTALRM', 'PROF', 'WINCH', 'IO', 'PWR', 'SYS'];
// Signals whose default action dumps core (systemd sets LimitCORE=infinity, so
// these end up as CLD_DUMPED / Result=core-dump).
const CORE_SIGNALS = new Set(['SIGQUIT', 'SIGILL', 'SIGTRAP', 'SIGABRT', 'SIGBUS', 'SIGFPE', 'SIGSEGV', 'SIGXCPU', 'SIGXFSZ', 'SIGSYS']);
// is_clean_exit(EXIT_CLEAN_DAEMON): these signals count as a clean death.
const CLEAN_SIGNALS = new Set(['SIGHUP', 'SIGINT', 'SIGTERM', 'SIGPIPE']);

function readConf() {
  const conf = {};
  for (const line of fs.readFileSync(path.join(unitDir, 'sv.conf'), 'utf8').split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) conf[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return conf;
}
function readNul(name) {
  try {
    const s = fs.readFileSync(path.join(unitDir, name), 'utf8');
    return s.split('\0').filter((x, i, a) => !(i === a.length - 1 && x === ''));
  } catch {
    return [];
  }
}

const conf = readConf();
const mainArgv = readNul('argv');
const envList = readNul('env');
const unitEnv = {};
for (const kv of envList) {
  const eq = kv.indexOf('=');
  if (eq > 0) unitEnv[kv.slice(0, eq)] = kv.slice(eq + 1);
}
const remainAfterExit = conf.REMAIN_AFTER_EXIT === 'yes';
const timeoutStopMs = conf.TIMEOUT_STOP_MS === 'infinity' ? Infinity : Number(conf.TIMEOUT_STOP_MS || 5000);
const killSignal = Number(conf.KILL_SIGNAL || 15);
const sendSigkill = conf.SEND_SIGKILL !== 'no';
const collectFailed = conf.COLLECT_MODE === 'inactive-or-failed';
const logPath = conf.LOG;
const stateRoot = conf.STATE_ROOT;
const uid = conf.UID ? Number(conf.UID) : undefined;
const gid = conf.GID ? Number(conf.GID) : undefined;

// --- time ------------------------------------------------------------------
const rtBaseUs = BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000));
const hrBase = process.hrtime.bigint();
const uptimeBaseUs = (() => {
  const up = fs.readFileSync('/proc/uptime', 'utf8').split(' ')[0] ?? '0';
  const [a = '0', b = '0'] = up.split('.');
  return BigInt(a) * 1000000n + BigInt(b.padEnd(2, '0').slice(0, 2)) * 10000n;
})();
function nowRt() { return String(rtBaseUs + (process.hrtime.bigint() - hrBase) / 1000n); }
function nowMono() { return String(uptimeBaseUs + (process.hrtime.bigint() - hrBase) / 1000n); }

// --- /proc -------------------------------------------------------------------
function procStat(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return { state: f[0], ppid: Number(f[1]), pgrp: Number(f[2]), sid: Number(f[3]), cutime: Number(f[13]), cstime: Number(f[14]), start: f[19] };
  } catch {
    return null;
  }
}
function sessionPids(sid) {
  if (!sid) return [];
  const out = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const st = procStat(e);
    if (st && st.sid === sid && st.state !== 'Z' && st.state !== 'X') out.push(Number(e));
  }
  return out;
}
function reapedChildrenCpuNs() {
  const st = procStat('self');
  if (!st) return 0n;
  return BigInt(st.cutime + st.cstime) * BigInt(1e9 / CLK_TCK);
}
function registerPid(pid, kind) {
  if (!stateRoot || !pid) return;
  const st = procStat(pid);
  if (!st) return;
  try { fs.appendFileSync(path.join(stateRoot, 'pids'), `${pid} ${st.start} ${kind} ${conf.UNIT}\n`); } catch { /* ignore */ }
}
function killAll(pids, sig) {
  for (const p of pids) {
    try { process.kill(p, sig); } catch { /* gone */ }
  }
}

// --- state file ------------------------------------------------------------------
const state = {
  LOAD_STATE: 'loaded',
  ACTIVE_STATE: 'activating',
  SUB_STATE: 'start',
  RESULT: 'success',
  MAIN_PID: '0',
  CONTROL_PID: '0',
  EXEC_MAIN_PID: '0',
  EXEC_MAIN_CODE: '0',
  EXEC_MAIN_STATUS: '0',
  EXEC_MAIN_START_RT: '0',
  EXEC_MAIN_START_MONO: '0',
  EXEC_MAIN_EXIT_RT: '0',
  EXEC_MAIN_EXIT_MONO: '0',
  INACTIVE_EXIT_RT: '0', INACTIVE_EXIT_MONO: '0',
  ACTIVE_ENTER_RT: '0', ACTIVE_ENTER_MONO: '0',
  ACTIVE_EXIT_RT: '0', ACTIVE_EXIT_MONO: '0',
  INACTIVE_ENTER_RT: '0', INACTIVE_ENTER_MONO: '0',
  STATE_CHANGE_RT: '0', STATE_CHANGE_MONO: '0',
  CPU_NSEC_FINAL: '',
  MAIN_SID: '0',
  SUPERVISOR_PID: String(process.pid),
  SUPERVISOR_START: procStat(process.pid)?.start ?? '',
  SP_COUNT: '0',
};
function q(v) { return `'${String(v).replace(/'/g, `'\\''`)}'`; }
function writeState() {
  const body = Object.entries(state).map(([k, v]) => `${k}=${q(v)}`).join('\n') + '\n';
  const tmp = path.join(unitDir, `.state.${process.pid}`);
  fs.writeFileSync(tmp, body);
  fs.renameSync(tmp, path.join(unitDir, 'state.sh'));
}
function setState(active, sub) {
  const rt = nowRt(), mono = nowMono();
  const was = state.ACTIVE_STATE;
  if (active !== was) {
    if ((was === 'inactive' || was === 'activating' || was === 'failed') && (active === 'active' || active === 'activating')) {
      state.INACTIVE_EXIT_RT = rt; state.INACTIVE_EXIT_MONO = mono;
    }
    if (active === 'active') { state.ACTIVE_ENTER_RT = rt; state.ACTIVE_ENTER_MONO = mono; }
    if (was === 'active' && active !== 'active') { state.ACTIVE_EXIT_RT = rt; state.ACTIVE_EXIT_MONO = mono; }
    if (active === 'inactive' || active === 'failed') { state.INACTIVE_ENTER_RT = rt; state.INACTIVE_ENTER_MONO = mono; }
  }
  state.ACTIVE_STATE = active;
  state.SUB_STATE = sub;
  state.STATE_CHANGE_RT = rt; state.STATE_CHANGE_MONO = mono;
  writeState();
}
function log(msg) {
  try { fs.appendFileSync(logPath, `${msg}\n`); } catch { /* ignore */ }
}

// --- unit-file command line parsing (ExecStopPost=) -----------------------------
// Prefixes: '-' ignore failure, '@' explicit argv0, ':' no env expansion, '+' full privileges
// (User=/Group= not applied), '!', '!!' (ambient-capability variants: accepted, no effect here).
function parseCommand(raw) {
  let s = raw.trim();
  let ignore = false, explicitArgv0 = false, noEnv = false, privileged = false;
  for (;;) {
    if (s.startsWith('-')) { ignore = true; s = s.slice(1); }
    else if (s.startsWith('@')) { explicitArgv0 = true; s = s.slice(1); }
    else if (s.startsWith(':')) { noEnv = true; s = s.slice(1); }
    else if (s.startsWith('+')) { privileged = true; s = s.slice(1); }
    else if (s.startsWith('!')) { s = s.slice(1); }
    else break;
  }
  const words = splitWords(s);
  let file = words[0] ?? '';
  let argv = words;
  if (explicitArgv0) { file = words[0] ?? ''; argv = words.slice(1); }
  return { raw, file, argv, ignore, noEnv, privileged };
}
// extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)
function splitWords(s) {
  const out = [];
  let i = 0;
  const n = s.length;
  const esc = { n: '\n', t: '\t', r: '\r', a: '\x07', b: '\b', f: '\f', v: '\v', '\\': '\\', '"': '"', "'": "'", ' ': ' ', s: ' ', $: '$' };
  while (i < n) {
    while (i < n && /\s/.test(s[i])) i++;
    if (i >= n) break;
    let w = '';
    let quote = null;
    for (; i < n; i++) {
      const c = s[i];
      if (quote) {
        if (c === quote) { quote = null; continue; }
        if (c === '\\' && i + 1 < n) { i++; w += esc[s[i]] ?? s[i]; continue; }
        w += c;
        continue;
      }
      if (c === "'" || c === '"') { quote = c; continue; }
      if (c === '\\' && i + 1 < n) { i++; w += esc[s[i]] ?? s[i]; continue; }
      if (/\s/.test(c)) break;
      w += c;
    }
    out.push(w);
  }
  return out;
}
// replace_env_argv(): "$FOO" as a whole word expands to its whitespace-split
// words; "${FOO}" expands anywhere; "$$" is a literal "$".
function expandArgv(argv, env) {
  const out = [];
  for (const w of argv) {
    const m = /^\$([A-Za-z_][A-Za-z0-9_]*)$/.exec(w);
    if (m) {
      const v = env[m[1]];
      if (v !== undefined) out.push(...v.split(/\s+/).filter(Boolean));
      continue;
    }
    out.push(w.replace(/\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (all, name) => (all === '$$' ? '$' : (env[name] ?? ''))));
  }
  return out;
}
function resolveExecutable(file, env) {
  if (file.includes('/')) return file;
  for (const dir of (env.PATH ?? '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin').split(':')) {
    const p = path.join(dir, file);
    try { fs.accessSync(p, fs.constants.X_OK); if (fs.statSync(p).isFile()) return p; } catch { /* next */ }
  }
  return null;
}

const stopPost = readNul('stoppost').map(parseCommand);
state.SP_COUNT = String(stopPost.length);
stopPost.forEach((c, i) => {
  state[`SP_PATH_${i}`] = c.file;
  state[`SP_ARGV_${i}`] = c.argv.join(' ');
  state[`SP_IGNORE_${i}`] = c.ignore ? 'yes' : 'no';
  state[`SP_PID_${i}`] = '0';
  state[`SP_CODE_${i}`] = '0';
  state[`SP_STATUS_${i}`] = '0';
  state[`SP_START_${i}`] = '0';
  state[`SP_EXIT_${i}`] = '0';
});

// --- the state machine ------------------------------------------------------------
let logFd;
try { logFd = fs.openSync(logPath, 'a'); } catch { logFd = 'ignore'; }

let mainChild = null;
let mainAlive = false;
let stopping = false;       // a stop job is running
let phase = 'start';        // start | running | exited | stopping | final
let killTimer = null;

function decodeExit(code, signal) {
  if (signal) {
    const dumped = CORE_SIGNALS.has(signal);
    const num = os.constants.signals[signal] ?? 0;
    return { execCode: dumped ? 3 : 2, status: num, clean: !dumped && CLEAN_SIGNALS.has(signal), f: dumped ? 'core-dump' : 'signal' };
  }
  return { execCode: 1, status: code ?? 0, clean: code === 0, f: 'exit-code' };
}
function exitEnv() {
  const env = { ...unitEnv, SERVICE_RESULT: state.RESULT };
  if (state.EXEC_MAIN_PID !== '0' && state.EXEC_MAIN_EXIT_RT !== '0') {
    const c = Number(state.EXEC_MAIN_CODE);
    env.EXIT_CODE = c === 1 ? 'exited' : c === 2 ? 'killed' : 'dumped';
    env.EXIT_STATUS = c === 1 ? state.EXEC_MAIN_STATUS : (SIGNAMES[Number(state.EXEC_MAIN_STATUS)] ?? state.EXEC_MAIN_STATUS);
  }
  return env;
}

function startMain() {
  const rt = nowRt(), mono = nowMono();
  let file = mainArgv[0];
  let args = mainArgv.slice(1);
  let cwd = conf.WORKDIR || '/';
  // Failures systemd reports as exit statuses of the forked child.
  let synthetic = null;
  if (conf.USER_MISSING) synthetic = { status: 217, msg: `Failed to determine user credentials: No such process` };
  else if (conf.WORKDIR) {
    let ok = false;
    try { ok = fs.statSync(conf.WORKDIR).isDirectory(); } catch { ok = false; }
    if (!ok) synthetic = { status: 200, msg: 'Changing to the requested working directory failed: No such file or directory' };
  }
  if (synthetic) {
    log(`${conf.UNIT}: ${synthetic.msg}`);
    file = '/bin/sh';
    args = ['-c', `exit ${synthetic.status}`];
    cwd = '/';
  }
  const opts = { detached: true, stdio: ['ignore', logFd, logFd], env: unitEnv, cwd, argv0: synthetic ? 'sh' : mainArgv[0] };
  if (!synthetic) {
    if (uid !== undefined) opts.uid = uid;
    if (gid !== undefined) opts.gid = gid;
  }
  try {
    mainChild = spawn(file, args, opts);
  } catch (e) {
    mainChild = null;
    log(`${conf.UNIT}: Failed to execute ${file}: ${e.message}`);
  }
  state.EXEC_MAIN_START_RT = rt;
  state.EXEC_MAIN_START_MONO = mono;
  if (mainChild && mainChild.pid) {
    mainAlive = true;
    state.MAIN_PID = String(mainChild.pid);
    state.EXEC_MAIN_PID = String(mainChild.pid);
    state.MAIN_SID = String(mainChild.pid);
    if (conf.NICE) { try { os.setPriority(mainChild.pid, Number(conf.NICE)); } catch { /* ignore */ } }
    registerPid(mainChild.pid, 'unit-main');
    mainChild.on('exit', (code, signal) => onMainExit(code, signal));
    mainChild.on('error', (e) => log(`${conf.UNIT}: ${e.message}`));
    phase = 'running';
    setState('active', 'running');
  } else {
    // exec failed before a pid existed: systemd's 203/EXEC.
    phase = 'running';
    setState('active', 'running');
    mainChild?.on('error', (e) => log(`${conf.UNIT}: Failed to execute ${file}: ${e.message}`));
    setImmediate(() => onMainExit(203, null));
  }
}

function onMainExit(code, signal) {
  mainAlive = false;
  const d = decodeExit(code, signal);
  state.MAIN_PID = '0';
  state.EXEC_MAIN_CODE = String(d.execCode);
  state.EXEC_MAIN_STATUS = String(d.status);
  state.EXEC_MAIN_EXIT_RT = nowRt();
  state.EXEC_MAIN_EXIT_MONO = nowMono();
  state.CPU_NSEC_FINAL = String(reapedChildrenCpuNs());
  if (!d.clean && state.RESULT === 'success') state.RESULT = d.f;
  if (stopping) {
    writeState();
    waitSessionEmpty();
    return;
  }
  if (state.RESULT === 'success' && remainAfterExit) {
    phase = 'exited';
    setState('active', 'exited');
    return;
  }
  // service_enter_stop / service_enter_signal(STOP_SIGTERM)
  stopping = true;
  phase = 'stopping';
  killLeftoversThenStopPost();
}

// SIGTERM (KillSignal) to everything left in the "cgroup", SIGKILL after
// TimeoutStopSec, then ExecStopPost.
function killLeftoversThenStopPost() {
  const sid = Number(state.MAIN_SID);
  const left = sessionPids(sid);
  if (left.length === 0 && !mainAlive) { runStopPost(0); return; }
  setState('deactivating', 'stop-sigterm');
  killAll(left, killSignal);
  armKillTimer();
  waitSessionEmpty();
}
function armKillTimer() {
  if (killTimer || !Number.isFinite(timeoutStopMs)) return;
  killTimer = setTimeout(() => {
    if (state.RESULT === 'success') state.RESULT = 'timeout';
    if (sendSigkill) {
      setState('deactivating', 'stop-sigkill');
      killAll(sessionPids(Number(state.MAIN_SID)), 'SIGKILL');
    }
  }, timeoutStopMs);
}
function waitSessionEmpty() {
  const tick = () => {
    if (mainAlive || sessionPids(Number(state.MAIN_SID)).length > 0) { setTimeout(tick, 10); return; }
    if (killTimer) { clearTimeout(killTimer); killTimer = null; }
    runStopPost(0);
  };
  tick();
}

function runStopPost(i) {
  if (i >= stopPost.length) { finish(); return; }
  const cmd = stopPost[i];
  const env = exitEnv();
  const argv = cmd.noEnv ? cmd.argv : expandArgv(cmd.argv, env);
  const file = resolveExecutable(cmd.noEnv ? cmd.file : expandArgv([cmd.file], env)[0] ?? '', env);
  state.CONTROL_PID = '0';
  state[`SP_START_${i}`] = nowRt();
  if (!file) {
    log(`${conf.UNIT}: Failed to locate executable ${cmd.file}: No such file or directory`);
    onControlExit(i, 203, null);
    return;
  }
  const opts = { detached: true, stdio: ['ignore', logFd, logFd], env, cwd: conf.WORKDIR && fs.existsSync(conf.WORKDIR) ? conf.WORKDIR : '/', argv0: argv[0] ?? file };
  if (uid !== undefined && !cmd.privileged) opts.uid = uid;
  if (gid !== undefined && !cmd.privileged) opts.gid = gid;
  let child;
  try {
    child = spawn(file, argv.slice(1), opts);
  } catch (e) {
    log(`${conf.UNIT}: Failed to execute ${file}: ${e.message}`);
    onControlExit(i, 203, null);
    return;
  }
  if (!child.pid) {
    child.on('error', () => {});
    onControlExit(i, 203, null);
    return;
  }
  state.CONTROL_PID = String(child.pid);
  state[`SP_PID_${i}`] = String(child.pid);
  setState('deactivating', 'stop-post');
  let timer = null;
  if (Number.isFinite(timeoutStopMs)) {
    timer = setTimeout(() => {
      if (state.RESULT === 'success') state.RESULT = 'timeout';
      try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ }
    }, timeoutStopMs);
  }
  child.on('exit', (code, signal) => {
    if (timer) clearTimeout(timer);
    onControlExit(i, code, signal);
  });
  child.on('error', () => {});
}
function onControlExit(i, code, signal) {
  const d = decodeExit(code, signal);
  state.CONTROL_PID = '0';
  state[`SP_CODE_${i}`] = String(d.execCode);
  state[`SP_STATUS_${i}`] = String(d.status);
  state[`SP_EXIT_${i}`] = nowRt();
  const ok = code === 0 && !signal;
  if (!ok && !stopPost[i].ignore) {
    if (state.RESULT === 'success') state.RESULT = d.f === 'exit-code' ? 'exit-code' : d.f;
    finish();
    return;
  }
  runStopPost(i + 1);
}

function finish() {
  phase = 'final';
  stopping = false;
  if (state.RESULT === 'success') {
    setState('inactive', 'dead');
    unload();
  } else {
    setState('failed', 'failed');
    if (collectFailed) unload();
  }
  try { if (typeof logFd === 'number') fs.closeSync(logFd); } catch { /* ignore */ }
  process.exit(0);
}
// A transient unit that is inactive and unreferenced is garbage-collected at
// once: from now on it reads as LoadState=not-found.
function unload() {
  const gone = path.join(path.dirname(unitDir), `.gone-${path.basename(unitDir)}-${process.pid}`);
  try {
    fs.renameSync(unitDir, gone);
    fs.rmSync(gone, { recursive: true, force: true });
  } catch { /* ignore */ }
}

function onStopRequest() {
  if (phase === 'running') {
    stopping = true;
    phase = 'stopping';
    setState('deactivating', 'stop-sigterm');
    killAll(sessionPids(Number(state.MAIN_SID)), killSignal);
    armKillTimer();
    if (!mainAlive) waitSessionEmpty();
  } else if (phase === 'exited') {
    stopping = true;
    phase = 'stopping';
    killLeftoversThenStopPost();
  }
  // start/stopping/final: a stop is already under way or pointless.
}
// Signal handlers do not keep node's event loop alive; this does (the unit
// may sit in active/exited until someone stops it).
const keepAlive = setInterval(() => {}, 1 << 30);
void keepAlive;
process.on('SIGUSR1', onStopRequest);
process.on('SIGTERM', onStopRequest);
process.on('SIGHUP', () => {});
process.on('SIGPIPE', () => {});

startMain();
try {
  const fd = fs.openSync(path.join(unitDir, 'ready'), fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  fs.writeSync(fd, `ok ${state.MAIN_PID}\n`);
  fs.closeSync(fd);
} catch { /* systemd-run gave up waiting; carry on */ }
