"""BraTS label values, tumour regions and channel orders: the one place they are defined.

Paper §1. Every other module imports these names;
nothing else hard-codes a label value, a modality order or a region order.
"""

# Tensor layout everywhere: [B, D, H, W, C], channels last, where D, H, W are
# the NIfTI array axes as nibabel returns them (i, j, k; 240 x 240 x 155 for
# BraTS), so the paper's 160 x 192 x 128 crop is taken along (i, j, k).

# Input modalities, in the channel order of every tensor this project makes
# (C = 4 in this order). The strings are the BraTS
# 2018-2021 file suffixes (`Brats18_<id>_t1ce.nii.gz`, ...).
MODALITIES = ("t1", "t1ce", "t2", "flair")
NUM_MODALITIES = len(MODALITIES)

# BraTS 2023+ file suffixes for the same modalities, in the same order.
MODALITIES_2023 = ("t1n", "t1c", "t2w", "t2f")

# Label map values (BraTS 2017-2021).
LABEL_BACKGROUND = 0
LABEL_NCR_NET = 1  # necrotic and non-enhancing tumour core
LABEL_ED = 2  # peritumoral edema
LABEL_ET = 4  # enhancing tumour
LABEL_ET_2023 = 3  # BraTS 2023+ writes enhancing tumour as 3
LABEL_VALUES = (LABEL_BACKGROUND, LABEL_NCR_NET, LABEL_ED, LABEL_ET)

# The three nested output regions, in the network's output channel order
# ([B, D, H, W, 3]: channel 0 = WT, 1 = TC, 2 = ET), each the set of labels
# that belongs to it.
REGIONS = ("WT", "TC", "ET")
REGION_LABELS = {
    "WT": (LABEL_NCR_NET, LABEL_ED, LABEL_ET),  # whole tumour
    "TC": (LABEL_NCR_NET, LABEL_ET),  # tumour core
    "ET": (LABEL_ET,),  # enhancing tumour
}
NUM_REGIONS = len(REGIONS)

# The encoder has three stride-2 stages: spatial sizes fed to the
# segmentation network must be divisible by this.
SPATIAL_DIVISOR = 8
# The VAE branch halves once more (VD) and must upsample back to the
# encoder endpoint exactly, so training crops must be divisible by this.
TRAIN_CROP_DIVISOR = 16

# Paper §3.7 training crop and the BraTS volume size.
PAPER_CROP = (160, 192, 128)
# Where a training crop's window is drawn: anywhere in the volume's grid (§3.7),
# or inside the brain's bounding box (train.py --crop_from).
CROP_FROM = ("grid", "brain_box")
BRATS_SHAPE = (240, 240, 155)
