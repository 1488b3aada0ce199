"""Offline tokenizers for the tiny models, trained with the ``tokenizers`` library on a shipped corpus.

The released checkpoints' tokenizers cannot be downloaded at run time (house rule), and the tiny models must
still go through the real prompt/decoding code paths, so we train small ones with the same *conventions*:

- Llama-style (OpenVLA): metaspace ``▁`` pieces, ``<unk>``=0, ``<s>``=1 (BOS, prepended), ``</s>``=2, a ``<PAD>``
  token at id ``V_base`` (upstream: 32000) and the embedding padded to a multiple of 64. The last 256 ids of the
  base vocabulary (``V_base-256 .. V_base-1``, upstream 31744..31999) are the action tokens, exactly as OpenVLA
  overwrites the least frequent Llama pieces.
- Qwen-style (GR00T/Eagle): byte-level BPE with no BOS and chat/image special tokens appended after the BPE
  vocabulary (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<img>``, ``</img>``, ``<IMG_CONTEXT>``).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from models.common.errors import CheckpointError

logger = logging.getLogger(__name__)

METASPACE = "\u2581"

_VERBS = ["pick up", "put", "place", "open", "close", "turn on", "turn off", "push", "stack", "move", "lift",
          "grasp", "slide", "rotate", "pour", "wipe", "fold", "insert", "drop", "carry"]
_OBJECTS = ["black bowl", "white bowl", "plate", "alphabet soup", "cream cheese", "tomato sauce", "ketchup",
            "butter", "milk", "orange juice", "chocolate pudding", "salad dressing", "bbq sauce", "basket",
            "wine bottle", "wine rack", "mug", "red mug", "yellow and white mug", "book", "caddy", "frying pan",
            "moka pot", "microwave", "stove", "top drawer", "bottom drawer", "middle drawer", "cabinet",
            "cookie box", "ramekin", "tray", "cup", "spoon", "fork", "knife", "towel", "sponge", "block", "cube"]
_PLACES = ["on the plate", "in the basket", "on the stove", "in the top drawer of the cabinet",
           "on top of the cabinet", "on the wine rack", "in the microwave", "on the left plate",
           "on the right plate", "next to the cookie box", "in the tray", "on the table", "into the caddy",
           "behind the mug", "in front of the book", "between the plate and the ramekin"]
_COMMON = """the of and to a in is it you that he was for on are with as his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause much
mean before move right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own page should
country found answer school grow study still learn plant cover food sun four between state keep eye never last
let thought city tree cross farm hard start might story saw far sea draw left late run while press close night
real life few north open seem together next white children begin got walk example ease paper group always music
those both mark often letter until mile river car feet care second enough plain girl usual young ready above
ever red list though feel talk bird soon body dog family direct pose leave song measure door product black short
numeral class wind question happen complete ship area half rock order fire south problem piece told knew pass
since top whole king space heard best hour better true during hundred five remember step early hold west ground
interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct
able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat common gold possible plane
stead dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among grand ball yet wave drop heart am present heavy dance engine position arm wide sail
material size vary settle speak weight general ice matter circle pair include divide syllable felt perhaps pick
sudden count square reason length represent art subject region energy hunt probable bed brother egg ride cell
believe fraction forest sit race window store summer train sleep prove lone leg exercise wall catch mount wish
sky board joy winter sat written wild instrument kept glass grass cow job edge sign visit past soft fun bright
gas weather month million bear finish happy hope flower clothe strange gone jump baby eight village meet root
buy raise solve metal whether push seven paragraph third shall held hair describe cook floor either result burn
hill safe cat century consider type law bit coast copy phrase silent tall sand soil roll temperature finger
industry value fight lie beat excite natural view sense ear else quite broke case middle kill son lake moment
scale loud spring observe child straight consonant nation dictionary bit robot arm gripper action should take
gripper camera wrist image state joint velocity position orientation trajectory""".split()


def instruction_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """LIBERO-like instruction strings plus common-word sentences (deterministic for a given seed)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(f"{rng.choice(_VERBS)} the {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}")
        lines.append(" ".join(rng.choice(_COMMON) for _ in range(rng.randint(4, 12))))
    lines.append("In: What action should the robot take to put the bowl on the plate?\nOut:")
    lines.append(string.ascii_letters + string.digits + string.punctuation)
    return lines


def train_llama_style(vocab_base: int, corpus: list[str] | None = None) -> Tokenizer:
    """Train a metaspace BPE with ids ``<unk>``=0, ``<s>``=1, ``</s>``=2 and exactly ``vocab_base`` base ids.

    ``<PAD>`` is added afterwards at id ``vocab_base``, like OpenVLA's pad token 32000.
    """
    corpus = corpus or instruction_corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="first")
    alphabet = list(string.printable) + [METASPACE]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_base, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
        min_frequency=1, show_progress=False, limit_alphabet=len(alphabet) + 10,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    _pad_base_vocab(tok, vocab_base)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<PAD>"])
    if tok.token_to_id("<PAD>") != vocab_base:
        raise RuntimeError("pad token did not land on id vocab_base")
    return tok


def _pad_base_vocab(tok: Tokenizer, vocab_base: int) -> None:
    """If the corpus was too small for ``vocab_base`` merges, fill the gap with never-produced pieces."""
    size = tok.get_vocab_size()
    if size > vocab_base:
        raise RuntimeError(f"trained vocab {size} exceeds requested {vocab_base}")
    if size < vocab_base:
        fillers = [f"{METASPACE}{a}{b}{c}" for a, b, c in itertools.product("QXZJ", "qxzj", "0123456789")]
        tok.add_tokens(fillers[: vocab_base - size])
        logger.info("padded base vocab with %d filler pieces", vocab_base - size)


def train_qwen_style(vocab_bpe: int, corpus: list[str] | None = None) -> Tokenizer:
    """Byte-level BPE of ``vocab_bpe`` ids followed by Qwen/Eagle special tokens."""
    corpus = corpus or instruction_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if tok.get_vocab_size() < vocab_bpe:
        tok.add_tokens([f"Ġfiller{i}" for i in range(vocab_bpe - tok.get_vocab_size())])
    tok.add_special_tokens(QWEN_SPECIALS)
    return tok


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def save_tokenizer(tok: Tokenizer, out_dir: Path, config: dict[str, object]) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``special_tokens_map.json``) like HF does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {k: v for k, v in config.items() if k.endswith("_token") and v is not None}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def load_tokenizer(path: Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a checkpoint directory (no sentencepiece, no network)."""
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: tokenizer.json missing (only the fast-tokenizer JSON format is supported)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as exc:
        raise CheckpointError(f"{f}: unreadable tokenizer ({exc})") from exc
