/**
 * POSIX shell quoting. Every word sent to a remote shell goes through `shq`; nothing from a grant
 * is ever interpolated unquoted. Single quotes make every byte literal except the quote itself.
 */
export function shq(word: string): string {
  if (word.includes("\0")) throw new Error("refusing to quote a string containing NUL");
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

/** Quote each word and join them into one command line. */
export function shJoin(words: readonly string[]): string {
  return words.map(shq).join(" ");
}
