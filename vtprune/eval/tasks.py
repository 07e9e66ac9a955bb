"""The evaluation tasks vtprune knows by name. Kept free of lmms-eval imports so that validation is instant."""

from vtprune.registry import Registry

TASKS: Registry[str] = Registry("task", "eval.tasks")

# name -> one-line description
for _name, _desc in {
    "textvqa_val": "TextVQA validation (lmms-eval official; needs the lmms-lab-encoder/textvqa dataset)",
    "vqav2_val": "VQAv2 validation (lmms-eval official; needs lmms-lab-encoder/VQAv2)",
    "vqav2_val_lite": "VQAv2 validation, lite subset (lmms-eval official; needs lmms-lab-encoder/LMMs-Eval-Lite)",
    "llava_in_the_wild": "LLaVA-Bench in the wild (lmms-eval official; GPT judge, unscored without a key)",
    "vtprune_textvqa_mini": "offline mirror of textvqa_val: generated images, official scoring",
    "vtprune_vqav2_mini": "offline mirror of vqav2_val: generated images, official scoring",
    "vtprune_llava_bench_mini": "offline mirror of llava_in_the_wild: generated images, judge-scored (unscored offline)",
}.items():
    TASKS.add(_name, _desc)
