// The built-in corpus generator.
//
// A lexicon of a few hundred invented words is built from syllables (fixed seed), then each split
// is a sequence of short paragraphs drawn from a small grammar (seed per split). The structure a
// model can learn, from local to longer range:
//   - spelling: words are built from a fixed inventory of onsets, vowels and codas;
//   - morphology: plurals (-s/-es, and -en for an irregular class), verb -s/-es and -ed/-d,
//     irregular past tenses, adjectives with typical endings and adverbs in -ly;
//   - agreement: a/an before vowels, subject/verb number (is/are, was/were, -s, do/does),
//     number words with singular/plural nouns, pronouns that follow the character's name ending;
//   - meaning: verbs only take objects of their class (eating verbs take foods, ...);
//   - facts: every named character has a fixed home town, pet and favourite food, repeated across
//     the corpus; arithmetic sentences are always correct;
//   - discourse: each paragraph keeps one tense and one main character, capitalisation and
//     punctuation follow fixed rules, dialogue uses quotes.
#include "data/corpus.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <string>
#include <vector>

#include "core/rng.h"
#include "data/tokenizer.h"

namespace mpt::data {

namespace {

constexpr uint64_t kCorpusSeed = 0x6D70742D636F7270ULL;  // fixed; "mpt-corp" in ASCII
constexpr uint64_t kLexiconStream = 7;
constexpr size_t kTrainChars = 2'000'000;
constexpr size_t kValChars = 200'000;

// ---------------------------------------------------------------------------------------------
// Lexicon

enum NounClass { kCreature = 0, kFood, kThing, kBuilding, kNumNounClasses };
constexpr int kAnyObject = -1;

struct Noun {
  std::string sg, pl;
};

struct Verb {
  std::string base, s3, past;
  int object_class = kAnyObject;  // for transitive verbs: which nouns they take
};

enum Pronoun { kShe = 0, kHe, kThey };

struct Person {
  std::string name;
  Pronoun pronoun;
  int home;      // index into places
  int pet;       // index into creature nouns
  int pet_adj;   // index into adjectives
  int food;      // index into food nouns
};

struct Lexicon {
  std::vector<Noun> nouns[kNumNounClasses];
  std::vector<Verb> transitive;
  std::vector<Verb> intransitive;
  std::vector<std::string> adjectives;  // any noun
  std::vector<std::string> moods;       // creatures and people
  std::vector<std::string> adverbs;
  std::vector<std::string> places;
  std::vector<Person> people;
};

// Real English function words the grammar uses; invented words must not collide with them.
const char* const kFunctionWords[] = {
    "a", "an", "the", "and", "but", "because", "so", "is", "are", "was", "were", "has", "have",
    "had", "in", "near", "under", "behind", "beside", "of", "to", "with", "lives", "lived",
    "live", "likes", "liked", "like", "said", "asked", "where", "what", "do", "does", "did",
    "not", "very", "plus", "minus", "times", "yes", "no", "she", "he", "they", "her", "his",
    "their", "you", "i", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "every", "this", "many", "some", "day", "then", "eat", "there", "at", "on", "it",
    "me", "we", "us", "be", "by", "for", "or", "if", "as", "up", "go", "see", "saw", "pet"};

bool is_vowel(char c) { return c == 'a' || c == 'e' || c == 'i' || c == 'o' || c == 'u'; }

class WordMaker {
 public:
  explicit WordMaker(uint64_t seed) : rng_(seed) {
    for (const char* w : kFunctionWords) used_.insert(w);
  }

  // A new word of min_syl..max_syl syllables followed by `suffix`; `tail_ok` may reject endings.
  template <typename Pred>
  std::string make(int min_syl, int max_syl, const std::string& suffix, Pred tail_ok) {
    for (;;) {
      const int n = min_syl + static_cast<int>(rng_.below(static_cast<uint64_t>(max_syl - min_syl + 1)));
      std::string w;
      bool coda_before = false;
      for (int i = 0; i < n; ++i) {
        const bool last = (i == n - 1);
        if (i == 0) {
          w += pick(kOnsets);
        } else {
          // Inside a word: one plain consonant, so no long clusters and no vowel runs.
          w += pick(kInnerOnsets);
        }
        w += pick(kNuclei);
        if (last) {
          w += pick(kFinalCodas);
        } else if (!coda_before && rng_.below(4) == 0) {
          w += pick(kInnerCodas);
          coda_before = true;
          continue;
        }
        coda_before = false;
      }
      // A suffix that starts with a vowel (or y) needs a consonant before it: no "gothiic".
      if (!suffix.empty() && (is_vowel(suffix[0]) || suffix[0] == 'y') && is_vowel(w.back())) {
        continue;
      }
      w += suffix;
      if (w.size() < 3 || w.size() > 12) continue;
      if (!tail_ok(w)) continue;
      if (used_.insert(w).second) return w;
    }
  }
  std::string make(int min_syl, int max_syl, const std::string& suffix = "") {
    return make(min_syl, max_syl, suffix, [](const std::string&) { return true; });
  }

  Rng& rng() { return rng_; }

 private:
  template <size_t N>
  const char* pick(const char* const (&list)[N]) {
    return list[rng_.below(N)];
  }

  static constexpr const char* kOnsets[] = {"b",  "d",  "f",  "g",  "k",  "l",  "m",  "n",
                                            "p",  "r",  "s",  "t",  "v",  "z",  "sh", "th",
                                            "br", "kl", "dr", "gr", "st", "tr", "pl", "sk",
                                            "",   "",   "b",  "m",  "t",  "l"};
  static constexpr const char* kInnerOnsets[] = {"b", "d", "f", "g", "k", "l", "m", "n",
                                                 "p", "r", "s", "t", "v", "z", "th", "sh"};
  static constexpr const char* kNuclei[] = {"a", "e", "i", "o", "u",  "a",  "e",
                                            "i", "o", "a", "ai", "ou", "ee", "oo"};
  static constexpr const char* kInnerCodas[] = {"n", "r", "l", "m"};
  static constexpr const char* kFinalCodas[] = {"",  "",  "",  "",  "n",  "r",  "l",  "m",
                                                "s", "k", "t", "nd", "rk", "sh", "x", "b"};

  Rng rng_;
  std::set<std::string> used_;
};

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

bool sibilant_end(const std::string& w) {
  return ends_with(w, "s") || ends_with(w, "x") || ends_with(w, "sh") || ends_with(w, "z");
}

std::string s_form(const std::string& w) { return w + (sibilant_end(w) ? "es" : "s"); }

std::string past_form(const std::string& w) { return w + (ends_with(w, "e") ? "d" : "ed"); }

Lexicon build_lexicon() {
  Lexicon lx;
  WordMaker wm(derive_seed(kCorpusSeed, kLexiconStream));
  Rng& rng = wm.rng();

  const int noun_counts[kNumNounClasses] = {50, 36, 50, 30};
  for (int c = 0; c < kNumNounClasses; ++c) {
    for (int i = 0; i < noun_counts[c]; ++i) {
      Noun n;
      n.sg = wm.make(1, 3);
      // About one noun in eight has the irregular plural -en (after a consonant).
      if (i % 8 == 3 && !is_vowel(n.sg.back())) {
        n.pl = n.sg + "en";
      } else {
        n.pl = s_form(n.sg);
      }
      lx.nouns[c].push_back(n);
    }
  }

  // Transitive verbs: a fixed number per object class, plus some that take anything.
  const int trans_counts[kNumNounClasses + 1] = {12, 12, 16, 8, 10};
  for (int c = 0; c <= kNumNounClasses; ++c) {
    for (int i = 0; i < trans_counts[c]; ++i) {
      Verb v;
      v.base = wm.make(1, 2);
      v.s3 = s_form(v.base);
      v.past = past_form(v.base);
      // Irregular past: every fifth verb with an 'i' changes its last 'i' to 'a' (drim -> dram).
      const size_t at = v.base.rfind('i');
      if (i % 5 == 2 && at != std::string::npos && (at == 0 || v.base[at - 1] != 'a')) {
        std::string p = v.base;
        p[at] = 'a';
        v.past = p;
      }
      v.object_class = (c == kNumNounClasses) ? kAnyObject : c;
      lx.transitive.push_back(v);
    }
  }
  for (int i = 0; i < 30; ++i) {
    Verb v;
    v.base = wm.make(1, 2);
    v.s3 = s_form(v.base);
    v.past = past_form(v.base);
    lx.intransitive.push_back(v);
  }

  const char* const adj_suffixes[] = {"ish", "ous", "en", "y", "ic"};
  for (int i = 0; i < 45; ++i) {
    lx.adjectives.push_back(wm.make(1, 2, adj_suffixes[rng.below(5)]));
  }
  for (int i = 0; i < 20; ++i) lx.moods.push_back(wm.make(1, 2, "ful"));
  for (size_t i = 0; i < lx.adjectives.size(); i += 3) {
    const std::string& a = lx.adjectives[i];
    lx.adverbs.push_back(ends_with(a, "y") ? a.substr(0, a.size() - 1) + "ily" : a + "ly");
  }

  const char* const place_suffixes[] = {"var", "esh", "ith", "dun"};
  for (int i = 0; i < 20; ++i) {
    std::string p = wm.make(1, 2, place_suffixes[i % 4]);
    p[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(p[0])));
    lx.places.push_back(p);
  }

  // Named characters. The name's ending tells the pronoun: she-names end in 'a' or 'i',
  // he-names in a consonant, they-names in "el".
  for (int i = 0; i < 18; ++i) {
    Person p;
    p.pronoun = static_cast<Pronoun>(i % 3);
    if (p.pronoun == kShe) {
      p.name = wm.make(2, 2, (i % 2) ? "a" : "i", [](const std::string& w) {
        return !is_vowel(w[w.size() - 2]);
      });
    } else if (p.pronoun == kHe) {
      p.name = wm.make(1, 2, "", [](const std::string& w) { return !is_vowel(w.back()); });
    } else {
      p.name = wm.make(1, 2, "el");
    }
    p.name[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(p.name[0])));
    p.home = static_cast<int>(rng.below(lx.places.size()));
    p.pet = static_cast<int>(rng.below(lx.nouns[kCreature].size()));
    p.pet_adj = static_cast<int>(rng.below(lx.adjectives.size()));
    p.food = static_cast<int>(rng.below(lx.nouns[kFood].size()));
    lx.people.push_back(p);
  }
  return lx;
}

const Lexicon& lexicon() {
  static const Lexicon lx = build_lexicon();
  return lx;
}

// ---------------------------------------------------------------------------------------------
// Grammar

const char* const kNumberWords[] = {"zero",    "one",      "two",      "three",   "four",
                                    "five",    "six",      "seven",    "eight",   "nine",
                                    "ten",     "eleven",   "twelve",   "thirteen", "fourteen",
                                    "fifteen", "sixteen",  "seventeen", "eighteen", "nineteen",
                                    "twenty"};

const char* const kPrepositions[] = {"in", "near", "under", "behind", "beside"};

// A subject: its words, and whether the verb takes the third-person singular form.
struct Subject {
  std::string text;
  bool singular;
};

class Generator {
 public:
  Generator(const Lexicon& lx, uint64_t seed) : lx_(lx), rng_(seed) {}

  std::string run(size_t target_chars) {
    std::string out;
    out.reserve(target_chars + 1024);
    while (out.size() < target_chars) {
      if (rng_.below(7) == 0) {
        arithmetic_paragraph(out);
      } else {
        story_paragraph(out);
      }
      out += '\n';
    }
    return out;
  }

 private:
  // Index in [0, n) with a Zipf-like skew towards small indices (frequent words).
  size_t skewed(size_t n) {
    const double u = rng_.uniform();
    const size_t i = static_cast<size_t>(static_cast<double>(n) * u * u);
    return i < n ? i : n - 1;
  }
  bool chance(uint64_t num, uint64_t den) { return rng_.below(den) < num; }

  static std::string article_for(const std::string& next) {
    return is_vowel(next[0]) ? "an" : "a";
  }

  static void capitalize(std::string& s, size_t at = 0) {
    while (at < s.size() && !std::isalpha(static_cast<unsigned char>(s[at]))) ++at;
    if (at < s.size()) s[at] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[at])));
  }

  const Person& main() const { return lx_.people[main_]; }

  std::string pronoun_subject(const Person& p) const {
    return p.pronoun == kShe ? "she" : p.pronoun == kHe ? "he" : "they";
  }
  std::string pronoun_possessive(const Person& p) const {
    return p.pronoun == kShe ? "her" : p.pronoun == kHe ? "his" : "their";
  }

  // A noun phrase of the given class. `singular` is decided by the caller.
  std::string noun_phrase(int cls, bool singular, bool allow_numbers = true) {
    const Noun& n = lx_.nouns[cls][skewed(lx_.nouns[cls].size())];
    std::string adj;
    if (chance(1, 3)) {
      if (cls == kCreature && chance(1, 2)) {
        adj = lx_.moods[skewed(lx_.moods.size())];
      } else {
        adj = lx_.adjectives[skewed(lx_.adjectives.size())];
      }
      if (chance(1, 8)) adj = "very " + adj;
    }
    const std::string head = adj.empty() ? (singular ? n.sg : n.pl)
                                         : adj + " " + (singular ? n.sg : n.pl);
    if (singular) {
      const uint64_t r = rng_.below(20);
      if (r < 9) return "the " + head;
      if (r < 16) return article_for(head) + " " + head;
      if (r < 18) return "this " + head;
      return "every " + head;
    }
    const uint64_t r = rng_.below(20);
    if (r < 8) return "the " + head;
    if (r < 14 && allow_numbers) return std::string(kNumberWords[2 + rng_.below(8)]) + " " + head;
    if (r < 17) return "many " + head;
    return "some " + head;
  }

  Subject subject(bool allow_main = true) {
    if (allow_main && chance(3, 5)) {
      const Person& p = main();
      if (chance(7, 10)) return {pronoun_subject(p), p.pronoun != kThey};
      return {p.name, true};
    }
    if (chance(1, 3)) {
      const Person& p = lx_.people[skewed(lx_.people.size())];
      return {p.name, true};
    }
    const bool sg = chance(3, 5);
    return {noun_phrase(kCreature, sg), sg};
  }

  std::string verb_form(const Verb& v, bool singular) const {
    if (past_) return v.past;
    return singular ? v.s3 : v.base;
  }

  std::string object_for(const Verb& v) {
    int cls = v.object_class;
    if (cls == kAnyObject) cls = static_cast<int>(rng_.below(kNumNounClasses));
    if (cls == kCreature && chance(1, 4)) {
      // People can be objects of creature verbs too.
      return lx_.people[skewed(lx_.people.size())].name;
    }
    return noun_phrase(cls, chance(2, 3));
  }

  std::string place_phrase() {
    if (chance(1, 3)) return std::string("in ") + lx_.places[skewed(lx_.places.size())];
    const std::string& prep = kPrepositions[rng_.below(5)];
    const Noun& b = lx_.nouns[kBuilding][skewed(lx_.nouns[kBuilding].size())];
    return prep + " the " + (chance(3, 4) ? b.sg : b.pl);
  }

  // A clause without final punctuation, starting in lower case.
  std::string clause(bool allow_main = true) {
    const Subject s = subject(allow_main);
    const uint64_t kind = rng_.below(20);
    if (kind < 8) {  // transitive
      const Verb& v = lx_.transitive[skewed(lx_.transitive.size())];
      std::string c = s.text + " ";
      if (chance(1, 8)) {  // negation: do/does/did not + base form
        c += past_ ? "did not " : (s.singular ? "does not " : "do not ");
        c += v.base;
      } else {
        c += verb_form(v, s.singular);
      }
      c += " " + object_for(v);
      if (chance(1, 3)) c += " " + place_phrase();
      return c;
    }
    if (kind < 13) {  // intransitive
      const Verb& v = lx_.intransitive[skewed(lx_.intransitive.size())];
      std::string c = s.text + " " + verb_form(v, s.singular);
      if (chance(1, 3)) c += " " + lx_.adverbs[skewed(lx_.adverbs.size())];
      if (chance(1, 2)) c += " " + place_phrase();
      return c;
    }
    if (kind < 17) {  // copula
      std::string be = past_ ? (s.singular ? "was" : "were") : (s.singular ? "is" : "are");
      std::string adj = (chance(1, 2) ? lx_.moods[skewed(lx_.moods.size())]
                                      : lx_.adjectives[skewed(lx_.adjectives.size())]);
      if (chance(1, 6)) adj = "very " + adj;
      return s.text + " " + be + " " + adj;
    }
    // possession with a counted noun: "has three zorps" / "have one zorp"
    const std::string have = past_ ? "had" : (s.singular ? "has" : "have");
    const size_t count = 1 + rng_.below(9);
    const int cls = chance(1, 2) ? kThing : kFood;
    const Noun& n = lx_.nouns[cls][skewed(lx_.nouns[cls].size())];
    return s.text + " " + have + " " + kNumberWords[count] + " " + (count == 1 ? n.sg : n.pl);
  }

  // A fact about the main character that never changes across the corpus.
  std::string fact() {
    const Person& p = main();
    const bool by_name = chance(1, 2);
    const std::string who = by_name ? p.name : pronoun_subject(p);
    const bool sg = by_name || p.pronoun != kThey;
    const Noun& pet = lx_.nouns[kCreature][p.pet];
    const std::string& pet_adj = lx_.adjectives[p.pet_adj];
    const Noun& food = lx_.nouns[kFood][p.food];
    switch (rng_.below(4)) {
      case 0:
        return who + " " + (past_ ? "lived" : sg ? "lives" : "live") + " in " + lx_.places[p.home];
      case 1:
        return who + " " + (past_ ? "had" : sg ? "has" : "have") + " " + article_for(pet_adj) +
               " " + pet_adj + " " + pet.sg;
      case 2:
        return who + " " + (past_ ? "liked" : sg ? "likes" : "like") + " " + food.pl;
      default:
        return pronoun_possessive(p) + " " + pet.sg + " " + (past_ ? "was" : "is") + " " +
               pet_adj;
    }
  }

  void sentence(std::string& out, std::string body, char end = '.') {
    capitalize(body);
    if (!out.empty() && out.back() != '\n') out += ' ';
    out += body;
    out += end;
  }

  void dialogue(std::string& out) {
    const Person& p = main();
    const Person* asker = &lx_.people[skewed(lx_.people.size())];
    if (asker == &p) asker = &lx_.people[(main_ + 1) % lx_.people.size()];
    std::string q, a;
    switch (rng_.below(3)) {
      case 0:
        q = "Where do you live, " + p.name + "?";
        a = "I live in " + lx_.places[p.home];
        break;
      case 1:
        q = "What do you like, " + p.name + "?";
        a = "I like " + lx_.nouns[kFood][p.food].pl;
        break;
      default: {
        const std::string& adj = lx_.adjectives[p.pet_adj];
        q = "Do you have a pet, " + p.name + "?";
        a = "Yes, I have " + article_for(adj) + " " + adj + " " + lx_.nouns[kCreature][p.pet].sg;
        break;
      }
    }
    if (!out.empty() && out.back() != '\n') out += ' ';
    out += "\"" + q + "\" " + (past_ ? "asked " : "asks ") + asker->name + ". \"" + a + ",\" " +
           (past_ ? "said " : "says ") + p.name + ".";
  }

  void story_paragraph(std::string& out) {
    main_ = skewed(lx_.people.size());
    past_ = chance(3, 5);
    const Person& p = main();
    // Opening: introduce the character by name.
    {
      const uint64_t r = rng_.below(3);
      if (r == 0) {
        sentence(out, p.name + " " + (past_ ? "lived" : "lives") + " in " + lx_.places[p.home]);
      } else if (r == 1 && past_) {
        size_t other = skewed(lx_.people.size());
        if (other == main_) other = (main_ + 1) % lx_.people.size();
        sentence(out, "one day, " + p.name + " met " + lx_.people[other].name);
      } else {
        const Noun& pet = lx_.nouns[kCreature][p.pet];
        const std::string& adj = lx_.adjectives[p.pet_adj];
        sentence(out, p.name + " " + (past_ ? "had" : "has") + " " + article_for(adj) + " " + adj +
                          " " + pet.sg);
      }
    }
    const int n = 2 + static_cast<int>(rng_.below(5));
    for (int i = 0; i < n; ++i) {
      const uint64_t r = rng_.below(20);
      if (r < 3) {
        sentence(out, fact());
      } else if (r < 5) {
        dialogue(out);
      } else if (r < 8) {
        const char* const joins[] = {", and ", ", but ", " because ", ", so "};
        sentence(out, clause() + joins[rng_.below(4)] + clause());
      } else if (r < 9) {
        sentence(out, "then " + clause());
      } else {
        sentence(out, clause());
      }
    }
  }

  void arithmetic_paragraph(std::string& out) {
    const int n = 3 + static_cast<int>(rng_.below(4));
    for (int i = 0; i < n; ++i) {
      std::string s;
      switch (rng_.below(3)) {
        case 0: {
          const uint64_t a = rng_.below(21);
          const uint64_t b = rng_.below(21 - a);
          s = std::string(kNumberWords[a]) + " plus " + kNumberWords[b] + " is " +
              kNumberWords[a + b];
          break;
        }
        case 1: {
          const uint64_t a = rng_.below(21);
          const uint64_t b = rng_.below(a + 1);
          s = std::string(kNumberWords[a]) + " minus " + kNumberWords[b] + " is " +
              kNumberWords[a - b];
          break;
        }
        default: {
          const uint64_t a = 1 + rng_.below(10);
          const uint64_t b = rng_.below(20 / a + 1);
          s = std::string(kNumberWords[a]) + " times " + kNumberWords[b] + " is " +
              kNumberWords[a * b];
          break;
        }
      }
      sentence(out, s);
    }
  }

  const Lexicon& lx_;
  Rng rng_;
  size_t main_ = 0;
  bool past_ = false;
};

std::vector<uint16_t> generate_tokens(Split s) { return encode(generate_builtin_corpus(s)); }

const std::vector<uint16_t>& train_tokens() {
  static const std::vector<uint16_t> t = generate_tokens(Split::train);
  return t;
}

const std::vector<uint16_t>& val_tokens() {
  static const std::vector<uint16_t> t = generate_tokens(Split::val);
  return t;
}

}  // namespace

std::string generate_builtin_corpus(Split s) {
  const uint64_t seed = derive_seed(kCorpusSeed, s == Split::train ? 0 : 1);
  Generator g(lexicon(), seed);
  return g.run(s == Split::train ? kTrainChars : kValChars);
}

const char* split_name(Split s) { return s == Split::train ? "train" : "val"; }

const std::vector<uint16_t>& builtin_corpus_tokens(Split s) {
  return s == Split::train ? train_tokens() : val_tokens();
}

std::string builtin_corpus_text(Split s, size_t max_chars) {
  const std::vector<uint16_t>& t = builtin_corpus_tokens(s);
  return decode(t.data(), std::min(max_chars, t.size()));
}

}  // namespace mpt::data
