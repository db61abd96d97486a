// Chat-template and tokenizer fixtures several test files share.

/**
 * The shipped model's ChatML with a variable besides the messages, as Qwen3's template reads
 * enable_thinking: false to open its answer with an empty thinking block.
 */
export const THINKING_TEMPLATE =
  "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}" +
  "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"

/**
 * A tokenizer.json normalizer whose expression backtracks without end on a long run of "a"s that
 * is not at the end of the text (nested alternatives before an anchor), and is quick on others.
 */
export const BACKTRACKING_NORMALIZER = { type: 'Replace', pattern: { Regex: '(a|aa)+$' }, content: '' }
