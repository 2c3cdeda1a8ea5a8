// Score a site with the MDN HTTP Observatory's own grader, on explicit ports.
//
// Usage: node scan.mjs HOST HTTP_PORT HTTPS_PORT MIN_SCORE
//
// The package's scan() takes only a hostname (ports 80 and 443), so this does
// what scan() does, step for step, with retrieve(host, {httpPort, httpsPort}):
// the http listener's redirect and the https answers are both graded. Run it
// with `node` directly and NODE_EXTRA_CA_CERTS set to the test certificate
// (the package's npx wrapper overwrites that variable).
//
// Exits 0 when the score is at least MIN_SCORE, every test passes, no test
// costs points, and the http redirect itself was graded; 1 otherwise.

import { retrieve } from "@mdn/mdn-http-observatory/src/retriever/retriever.js";
import { ALL_TESTS } from "@mdn/mdn-http-observatory/src/constants.js";
import { MINIMUM_SCORE_FOR_EXTRA_CREDIT } from "@mdn/mdn-http-observatory/src/grader/charts.js";
import {
  getGradeForScore,
  getScoreModifier,
} from "@mdn/mdn-http-observatory/src/grader/grader.js";

const [host, httpPort, httpsPort, minScoreArg] = process.argv.slice(2);
if (!host || !httpPort || !httpsPort) {
  console.error("usage: node scan.mjs HOST HTTP_PORT HTTPS_PORT [MIN_SCORE]");
  process.exit(2);
}
const minScore = Number(minScoreArg ?? 135);

const requests = await retrieve(host, {
  httpPort: Number(httpPort),
  httpsPort: Number(httpsPort),
});
const auto = requests.responses.auto;
if (!auto) {
  console.error(`observatory: cannot reach ${host} on ${httpPort} or ${httpsPort}`);
  process.exit(1);
}
// scan() refuses to grade an error page; so do we.
if (auto.status < 200 || (auto.status >= 400 && ![401, 403].includes(auto.status))) {
  console.error(`observatory: the site answered ${auto.status}`);
  process.exit(1);
}

// The scoring of scan(): bonuses count only when the penalties alone leave an A.
let withBonuses = 100;
let penaltiesOnly = 100;
const rows = ALL_TESTS.map((test) => {
  const output = test(requests);
  const modifier = output.result ? getScoreModifier(output.result) : 0;
  withBonuses += modifier;
  if (modifier < 0) penaltiesOnly += modifier;
  return { name: output.constructor.name, pass: output.pass, result: String(output.result), modifier };
});
const score = penaltiesOnly >= MINIMUM_SCORE_FOR_EXTRA_CREDIT ? withBonuses : penaltiesOnly;
const { grade } = getGradeForScore(score);

const nameWidth = Math.max(...rows.map((r) => r.name.length));
const width = Math.max(...rows.map((r) => r.result.length));
console.log(`MDN HTTP Observatory (grader ${process.env.OBSERVATORY_VERSION ?? ""})`);
console.log(`http://${host}:${httpPort}/ -> https://${host}:${httpsPort}/ (status ${auto.status})\n`);
console.log(`${"test".padEnd(nameWidth)} ${"pass".padEnd(4)} ${"result".padEnd(width)} points`);
for (const r of rows) {
  const points = r.modifier > 0 ? `+${r.modifier}` : `${r.modifier}`;
  const pass = (r.pass ? "yes" : "NO").padEnd(4);
  console.log(`${r.name.padEnd(nameWidth)} ${pass} ${r.result.padEnd(width)} ${points}`);
}
console.log(`\nscore ${score} (${grade}); required ${minScore}`);

const problems = [];
if (score < minScore) problems.push(`score ${score} is below ${minScore}`);
for (const r of rows) {
  if (!r.pass) problems.push(`${r.name} failed: ${r.result}`);
  if (r.modifier < 0) problems.push(`${r.name} costs ${r.modifier}`);
}
const redirect = rows.find((r) => r.name === "redirection");
if (redirect?.result !== "redirection-to-https") {
  problems.push(`the http listener was not graded as redirecting to https: ${redirect?.result}`);
}
for (const p of problems) console.error(`observatory: ${p}`);
process.exit(problems.length ? 1 : 0);
