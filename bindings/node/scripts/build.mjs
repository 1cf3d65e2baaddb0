// Builds the native addon with cargo and puts it where index.js loads it
// (instance_lifecycle.node beside index.js). No node-gyp, no download: the
// Rust toolchain and the crates.io registry are all it needs.
// Usage: node scripts/build.mjs [--release]
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const release = process.argv.includes('--release');
const args = ['build', '-p', 'instance-lifecycle-node', '--message-format=short'];
if (release) args.push('--release');
try {
  execFileSync('cargo', args, { cwd: here, stdio: 'inherit' });
} catch (e) {
  console.error(`instance-lifecycle: building the native addon failed (cargo ${args.join(' ')}): ${e.message}`);
  console.error('It needs a Rust toolchain (https://rustup.rs) and access to crates.io.');
  process.exit(1);
}
const target = process.env.CARGO_TARGET_DIR ?? join(here, '..', '..', 'target');
const file = { linux: 'libinstance_lifecycle_node.so', darwin: 'libinstance_lifecycle_node.dylib', win32: 'instance_lifecycle_node.dll' }[process.platform];
const built = join(target, release ? 'release' : 'debug', file);
if (!file || !existsSync(built)) {
  console.error(`instance-lifecycle: cargo finished but ${built} is not there`);
  process.exit(1);
}
copyFileSync(built, join(here, 'instance_lifecycle.node'));
console.log(`instance-lifecycle: ${built} -> instance_lifecycle.node`);
