"""LabNet, ImgNet and the ImgNet backbones."""
